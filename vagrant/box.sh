#!/bin/sh
# Builds a Debian 12 box for Vagrant's libvirt provider from Debian's packages alone (nothing is
# downloaded but the packages): `cargo xtask vagrant-box` runs it as root and adds the box.
#
#   box.sh OUT_DIR PUBKEY     writes OUT_DIR/authz-debian12.box
#
# The image: one MBR partition (ext4), Debian 12 by debootstrap with its distribution kernel, GRUB
# written by hand (this needs no partition devices, device-mapper or nbd: only an offset loop
# device), the `vagrant` user with passwordless sudo and Vagrant's insecure key (PUBKEY), as the
# box convention expects. Everything the kernel-path lane needs is in the image, since the guest
# may have no network to install from.
set -eu

out=$1
pubkey=$2
mirror=${AUTHZ_DEBIAN_MIRROR:-http://deb.debian.org/debian}
size_mib=4096
offset=1048576 # the partition starts at 1 MiB; GRUB's core image goes in the gap before it

work="$out/work"
raw="$work/disk.raw"
mnt="$work/root"
loop=""

cleanup() {
    for m in dev/pts dev proc sys; do
        mountpoint -q "$mnt/$m" 2>/dev/null && umount "$mnt/$m"
    done
    mountpoint -q "$mnt" 2>/dev/null && umount "$mnt"
    [ -n "$loop" ] && losetup -d "$loop" 2>/dev/null
    true
}
trap cleanup EXIT

rm -rf "$work"
mkdir -p "$mnt"
truncate -s "${size_mib}M" "$raw"
echo 'start=2048, type=83, bootable' | sfdisk -q "$raw"
loop=$(losetup -f --show -o "$offset" --sizelimit $((size_mib * 1048576 - offset)) "$raw")
mkfs.ext4 -q -L root "$loop"
uuid=$(blkid -s UUID -o value "$loop")
mount "$loop" "$mnt"

packages=systemd-sysv,udev,dbus,linux-image-amd64,grub-pc-bin,grub2-common,openssh-server,sudo
packages=$packages,ifupdown,isc-dhcp-client,iproute2,rsync,netbase,procps,ca-certificates,kmod
# What the lane drives pods with.
packages=$packages,curl,netcat-openbsd,bpftool
debootstrap --variant=minbase --include="$packages" bookworm "$mnt" "$mirror"

echo "authz-box" > "$mnt/etc/hostname"
printf '127.0.0.1 localhost\n127.0.1.1 authz-box\n' > "$mnt/etc/hosts"
echo "UUID=$uuid / ext4 errors=remount-ro 0 1" > "$mnt/etc/fstab"
# eth0 is the management interface Vagrant reaches the guest on; it adds the others itself.
cat > "$mnt/etc/network/interfaces" <<EOF
auto lo
iface lo inet loopback

allow-hotplug eth0
iface eth0 inet dhcp
EOF
echo 'UseDNS no' > "$mnt/etc/ssh/sshd_config.d/vagrant.conf"

chroot "$mnt" useradd -m -s /bin/bash vagrant
echo 'vagrant:vagrant' | chroot "$mnt" chpasswd
echo 'vagrant ALL=(ALL) NOPASSWD: ALL' > "$mnt/etc/sudoers.d/vagrant"
chmod 440 "$mnt/etc/sudoers.d/vagrant"
install -d -m 700 "$mnt/home/vagrant/.ssh"
install -m 600 "$pubkey" "$mnt/home/vagrant/.ssh/authorized_keys"
chroot "$mnt" chown -R vagrant:vagrant /home/vagrant/.ssh
# Each VM gets host keys of its own at first boot, not the image's.
rm -f "$mnt"/etc/ssh/ssh_host_*
cat > "$mnt/etc/systemd/system/ssh-hostkeys.service" <<EOF
[Unit]
Description=SSH host keys of this machine
Before=ssh.service
ConditionPathExists=!/etc/ssh/ssh_host_ed25519_key

[Service]
Type=oneshot
ExecStart=/usr/bin/ssh-keygen -A

[Install]
WantedBy=multi-user.target
EOF
chroot "$mnt" systemctl enable ssh-hostkeys.service >/dev/null 2>&1

# GRUB by hand: `update-grub` and `grub-install` in a chroot see the loop device, not the disk.
kernel=$(cd "$mnt/boot" && ls vmlinuz-* | sort -V | tail -n 1)
initrd="initrd.img-${kernel#vmlinuz-}"
mkdir -p "$mnt/boot/grub/i386-pc"
cp "$mnt"/usr/lib/grub/i386-pc/* "$mnt/boot/grub/i386-pc/"
chroot "$mnt" grub-mkimage -O i386-pc -o /boot/grub/i386-pc/core.img \
    -p '(hd0,msdos1)/boot/grub' biosdisk part_msdos ext2 normal linux search search_fs_uuid
cat > "$mnt/boot/grub/grub.cfg" <<EOF
set timeout=0
serial --unit=0 --speed=115200
terminal_input serial console
terminal_output serial console
menuentry "Debian 12" {
    search --no-floppy --fs-uuid --set=root $uuid
    linux /boot/$kernel root=UUID=$uuid ro console=ttyS0,115200 console=tty0 net.ifnames=0 biosdevname=0
    initrd /boot/$initrd
}
EOF
cp "$mnt/usr/lib/grub/i386-pc/boot.img" "$work/boot.img"
cp "$mnt/boot/grub/i386-pc/core.img" "$work/core.img"

chroot "$mnt" apt-get clean
rm -rf "$mnt"/var/lib/apt/lists/*
fstrim "$mnt" 2>/dev/null || true
cleanup
loop=""

# The MBR's boot code (its first 440 bytes; the partition table stays), then the core image
# from sector 1, where boot.img looks for it.
if [ "$(stat -c %s "$work/core.img")" -gt $((offset - 512)) ]; then
    echo "GRUB's core image does not fit before the partition" >&2
    exit 1
fi
dd if="$work/boot.img" of="$raw" bs=440 count=1 conv=notrunc status=none
dd if="$work/core.img" of="$raw" bs=512 seek=1 conv=notrunc status=none

qemu-img convert -c -O qcow2 "$raw" "$work/box.img"
printf '{"provider":"libvirt","format":"qcow2","virtual_size":%d}\n' $((size_mib / 1024)) > "$work/metadata.json"
cat > "$work/Vagrantfile" <<EOF
Vagrant.configure("2") do |config|
  config.vm.provider :libvirt do |libvirt|
    libvirt.disk_bus = "virtio"
  end
end
EOF
tar -C "$work" -cf "$out/authz-debian12.box.part" metadata.json Vagrantfile box.img
mv "$out/authz-debian12.box.part" "$out/authz-debian12.box"
rm -rf "$work"
echo "box: $out/authz-debian12.box"
