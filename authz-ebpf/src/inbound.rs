//! The inbound capture program alone, loaded once per protected pod with that pod's netns cookie
//! as its `POD_NETNS` global; its maps are the pinned maps of the main object.
#![no_std]
#![no_main]

#[allow(unused)]
mod helpers;
#[allow(unused)]
mod maps;
mod sklookup;

#[cfg(all(not(test), target_arch = "bpf"))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
