//! Reading a frame link: the link's bytes in, chunks of decoded [`Frame`]s out.
//!
//! What `FramedRead` and `ready_chunks` did together, with one difference that matters at a
//! million frames a second: every complete frame of the bytes read so far is decoded in one
//! call ([`FrameCodec::decode_into`]) instead of one call and one buffer advance per frame. A
//! chunk holds what the link had ready: it ends when a read would wait, or at `max` frames.

use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::BytesMut;
use tokio::io::AsyncRead;
use tokio_util::io::poll_read_buf;

use super::codec::{Frame, FrameCodec};

/// Free room made in the read buffer before each read (what `FramedRead` uses): more than a
/// tty's line buffer holds, so one read takes all a tty has.
const READ_ROOM: usize = 8 * 1024;

/// Frames decoded from one link, and how the link ended if it did.
#[derive(Debug)]
pub(super) struct Chunk {
    /// In the order they arrived.
    pub frames: Vec<Frame>,
    /// Set when the link ended after `frames`.
    pub end: Option<End>,
}

/// How a link ended.
#[derive(Debug)]
pub(super) enum End {
    /// The device closed it (end of stream).
    Closed,
    /// A read failed.
    Failed(io::Error),
}

/// Reads `R` and decodes it with a [`FrameCodec`].
#[derive(Debug)]
pub(super) struct FrameReader<R> {
    reader: R,
    codec: FrameCodec,
    buf: BytesMut,
    /// The link ended and its last chunk was handed out.
    done: bool,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    pub fn new(reader: R, codec: FrameCodec) -> Self {
        Self {
            reader,
            codec,
            buf: BytesMut::with_capacity(READ_ROOM),
            done: false,
        }
    }

    /// The next chunk of at most `max` frames, waiting for the link when it has none ready.
    /// Cancel safe: frames are only decoded in a call that returns them.
    pub async fn next_chunk(&mut self, max: usize) -> Chunk {
        poll_fn(|cx| self.poll_chunk(cx, max)).await
    }

    fn poll_chunk(&mut self, cx: &mut Context<'_>, max: usize) -> Poll<Chunk> {
        if self.done {
            return Poll::Ready(Chunk {
                frames: Vec::new(),
                end: Some(End::Closed),
            });
        }
        let mut frames = Vec::new();
        loop {
            // Room for what the bytes read so far can hold (a frame is at least 12 bytes, most
            // are 25 to 40), so the chunk is not grown step by step as it fills.
            frames.reserve((self.buf.len() / 24).min(max - frames.len()));
            self.codec.decode_into(&mut self.buf, &mut frames, max);
            if frames.len() >= max {
                return Poll::Ready(Chunk { frames, end: None });
            }
            self.buf.reserve(READ_ROOM);
            let read = poll_read_buf(Pin::new(&mut self.reader), cx, &mut self.buf);
            let end = match read {
                Poll::Pending if frames.is_empty() => return Poll::Pending,
                Poll::Pending => return Poll::Ready(Chunk { frames, end: None }),
                Poll::Ready(Ok(0)) => {
                    self.codec.finish_into(&mut self.buf, &mut frames);
                    End::Closed
                }
                Poll::Ready(Ok(_)) => continue,
                Poll::Ready(Err(err)) => End::Failed(err),
            };
            self.done = true;
            return Poll::Ready(Chunk {
                frames,
                end: Some(end),
            });
        }
    }
}
