//! A stream whose first bytes were already read (protocol sniffing) and are replayed first.
use std::{
    io,
    pin::Pin,
    task::{Context, Poll},
};

use bytes::{Buf, Bytes};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

pub struct Prefixed<S> {
    prefix: Bytes,
    inner: S,
}

impl<S> Prefixed<S> {
    pub fn new(prefix: Bytes, inner: S) -> Self {
        Prefixed { prefix, inner }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefixed<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// What the first bytes of a connection say it speaks.
#[derive(Debug, PartialEq, Eq, Clone, Copy)]
pub enum Sniffed {
    Http1,
    Http2,
    /// Not HTTP as far as the first bytes tell: relayed at L4 with L4 policy only, which is never
    /// less strict than the HTTP policy for the same request.
    Tcp,
}

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// Longest method token taken for HTTP.
const MAX_METHOD: usize = 32;

/// What the bytes so far say, or `None` while they could still be either (a slow client writing
/// its method one byte at a time is HTTP, not TCP).
pub fn sniff(first: &[u8]) -> Option<Sniffed> {
    let n = first.len().min(H2_PREFACE.len());
    if n > 0 && first[..n] == H2_PREFACE[..n] {
        return (n == H2_PREFACE.len()).then_some(Sniffed::Http2);
    }
    let token_len = first.iter().take_while(|b| is_tchar(**b)).count();
    match first.get(token_len) {
        _ if token_len > MAX_METHOD => Some(Sniffed::Tcp),
        Some(b' ') if token_len > 0 => Some(Sniffed::Http1),
        Some(_) => Some(Sniffed::Tcp),
        None => None,
    }
}

/// The verdict when no more bytes come in time (or the client half-closed): still ambiguous
/// means not HTTP, which gets the L4 policy, never less strict than the HTTP one.
pub fn sniff_final(first: &[u8]) -> Sniffed {
    sniff(first).unwrap_or(Sniffed::Tcp)
}

fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sniffing() {
        assert_eq!(sniff(b"GET / HTTP/1.1\r\n"), Some(Sniffed::Http1));
        assert_eq!(sniff(b"get / HTTP/1.1\r\n"), Some(Sniffed::Http1));
        assert_eq!(
            sniff(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"),
            Some(Sniffed::Http2)
        );
        assert_eq!(sniff(b"\x16\x03\x01\x02\x00"), Some(Sniffed::Tcp));
        assert_eq!(sniff(b"hello\n"), Some(Sniffed::Tcp));
        assert_eq!(sniff(b"\r\nGET / HTTP/1.1"), Some(Sniffed::Tcp));
        assert_eq!(sniff(&[b'A'; 40]), Some(Sniffed::Tcp));
    }

    #[test]
    fn slow_writers_are_waited_for() {
        // Every prefix of an HTTP/1 request line or the HTTP/2 preface is undecided, then HTTP.
        let line = b"GET /productpage HTTP/1.1\r\n";
        for i in 1..4 {
            assert_eq!(sniff(&line[..i]), None, "{i}");
        }
        assert_eq!(sniff(&line[..4]), Some(Sniffed::Http1));
        for i in 1..H2_PREFACE.len() {
            assert_eq!(sniff(&H2_PREFACE[..i]), None, "{i}");
        }
        // No more bytes in time: an undecided prefix is not HTTP.
        assert_eq!(sniff_final(b"GE"), Sniffed::Tcp);
        assert_eq!(sniff_final(b""), Sniffed::Tcp);
        assert_eq!(sniff_final(b"GET "), Sniffed::Http1);
    }
}
