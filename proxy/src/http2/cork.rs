//! Gathering a connection's writes until the task that drives it is done for now.
//!
//! h2 writes a DATA frame of 256 bytes or more straight from its payload, and flushes before it takes the next
//! frame: every response with a value of some size, and every Put towards etcd, is a socket write (and a TLS
//! record) of its own, even when etcd answered several calls at once. Under h2, [`Corked`] copies what h2 writes
//! into one buffer and treats h2's flushes as done; [`drive`], around the future that polls the connection, writes
//! that buffer out each time the future has been polled, that is before the task waits. Calls answered in one
//! wake-up then leave in one write, and nothing waits in the buffer while the task sleeps.
//!
//! The buffer is bounded: past [`LIMIT`] bytes a write first writes the buffer out, and waits (is `Pending`) while
//! the socket takes no more, as a socket's own write would.
//!
//! A connection holds a buffer only while it has bytes to write. Once they are out, the emptied buffer goes to its
//! thread's spare slot, and the next connection to write on that thread takes it from there: a busy worker reuses
//! one buffer of `LIMIT` bytes instead of allocating (and growing) one per turn, and an idle connection holds none.

use std::cell::Cell;
use std::future::{Future, poll_fn};
use std::io;
use std::pin::{Pin, pin};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Bytes gathered before a write goes to the socket without waiting for the end of the task's turn.
pub const LIMIT: usize = 64 * 1024;

thread_local! {
    /// An emptied buffer, for the next connection that writes on this thread (see the module's documentation).
    static SPARE: Cell<Vec<u8>> = const { Cell::new(Vec::new()) };
}

/// How long a finished connection's last bytes may take to leave.
const FINAL_WRITE: Duration = Duration::from_secs(5);

/// The I/O object h2 is given: writes are gathered (see the module's documentation).
pub struct Corked<T> {
    shared: Arc<Mutex<Shared<T>>>,
}

/// The driver's handle on a [`Corked`] connection.
pub struct Cork<T> {
    shared: Arc<Mutex<Shared<T>>>,
}

struct Shared<T> {
    io: T,
    buf: Vec<u8>,
    /// How much of `buf` has been written.
    written: usize,
    /// Bytes went to `io` (or wait in `buf`) since `io` was last flushed.
    dirty: bool,
    /// Inside [`drive`]'s poll: a flush may wait for the end of it.
    deferring: bool,
    /// A write of the gathered bytes failed; h2's next write (or flush) gets the error.
    failed: Option<(io::ErrorKind, String)>,
}

/// Wrap `io`: the I/O object for h2, and the handle for [`drive`].
pub fn cork<T>(io: T) -> (Corked<T>, Cork<T>) {
    let shared =
        Arc::new(Mutex::new(Shared { io, buf: Vec::new(), written: 0, dirty: false, deferring: false, failed: None }));
    (Corked { shared: shared.clone() }, Cork { shared })
}

/// Run `fut` (which polls the connection), writing out what the connection gathered after each poll. Once `fut`
/// has finished, its last bytes get `FINAL_WRITE` to leave.
pub async fn drive<T, F>(cork: Cork<T>, fut: F) -> F::Output
where
    T: AsyncWrite + Unpin,
    F: Future,
{
    let mut fut = pin!(fut);
    let output = poll_fn(|cx| {
        cork.lock().deferring = true;
        let polled = fut.as_mut().poll(cx);
        let mut shared = cork.lock();
        shared.deferring = false;
        if let Poll::Ready(Err(e)) = shared.poll_write_out(cx) {
            // The connection learns of it at its next write; make sure there is one soon.
            shared.failed = Some((e.kind(), e.to_string()));
            cx.waker().wake_by_ref();
        }
        polled
    })
    .await;
    let _ = tokio::time::timeout(FINAL_WRITE, poll_fn(|cx| cork.lock().poll_write_out(cx))).await;
    output
}

// === impl Cork ===

impl<T> Cork<T> {
    fn lock(&self) -> MutexGuard<'_, Shared<T>> {
        lock(&self.shared)
    }
}

fn lock<T>(shared: &Mutex<Shared<T>>) -> MutexGuard<'_, Shared<T>> {
    shared.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

// === impl Shared ===

impl<T: AsyncWrite + Unpin> Shared<T> {
    /// Write the gathered bytes to `io` and flush it (nothing to do after a turn that wrote nothing).
    fn poll_write_out(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if !self.dirty {
            return Poll::Ready(Ok(()));
        }
        while self.written < self.buf.len() {
            match ready!(Pin::new(&mut self.io).poll_write(cx, &self.buf[self.written..])) {
                Ok(0) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Ok(n) => self.written += n,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
        self.written = 0;
        give_back(std::mem::take(&mut self.buf));
        ready!(Pin::new(&mut self.io).poll_flush(cx))?;
        self.dirty = false;
        Poll::Ready(Ok(()))
    }

    /// The error of a failed write-out, for every write and flush after it.
    fn check_failed(&self) -> io::Result<()> {
        match &self.failed {
            Some((kind, message)) => Err(io::Error::new(*kind, message.clone())),
            None => Ok(()),
        }
    }

    /// Room for `len` more bytes: writes the buffer out first when it is full.
    fn poll_room(&mut self, cx: &mut Context<'_>, len: usize) -> Poll<io::Result<()>> {
        self.check_failed()?;
        if self.buf.len() - self.written + len > LIMIT && self.buf.len() > self.written {
            ready!(self.poll_write_out(cx))?;
        }
        if self.buf.capacity() == 0 {
            self.buf = SPARE.take();
            self.buf.reserve(len.max(LIMIT));
        }
        Poll::Ready(Ok(()))
    }
}

/// Keep an emptied buffer as this thread's spare, unless it has no allocation (a write-out that waited for its
/// flush comes here again with an empty one, which must not replace the spare) or grew past what a turn normally
/// needs (one write larger than [`LIMIT`]): that one is freed.
fn give_back(mut buf: Vec<u8>) {
    if buf.capacity() > 0 && buf.capacity() <= 2 * LIMIT {
        buf.clear();
        SPARE.set(buf);
    }
}

// === impl Corked ===

impl<T: AsyncRead + Unpin> AsyncRead for Corked<T> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut lock(&self.shared).io).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Corked<T> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        self.poll_write_vectored(cx, &[io::IoSlice::new(data)])
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let len = bufs.iter().map(|b| b.len()).sum();
        let mut shared = lock(&self.shared);
        ready!(shared.poll_room(cx, len))?;
        for b in bufs {
            shared.buf.extend_from_slice(b);
        }
        shared.dirty = true;
        Poll::Ready(Ok(len))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut shared = lock(&self.shared);
        shared.check_failed()?;
        if shared.deferring {
            return Poll::Ready(Ok(()));
        }
        shared.poll_write_out(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut shared = lock(&self.shared);
        ready!(shared.poll_write_out(cx))?;
        Pin::new(&mut shared.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::FutureExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Writes inside `drive` reach the peer when the driven future yields, in one piece, not at h2's flushes.
    #[tokio::test]
    async fn writes_leave_when_the_driven_future_yields() -> Result<(), Box<dyn std::error::Error>> {
        let (a, mut b) = tokio::io::duplex(LIMIT * 4);
        let (mut io, cork) = super::cork(a);
        let mut seen = vec![0u8; 11];
        drive(cork, async {
            io.write_all(b"hello ").await?;
            io.flush().await?;
            io.write_all(b"world").await?;
            io.flush().await?;
            // Nothing has left yet: the driven future has not yielded.
            let mut probe = [0u8; 1];
            assert!(b.read(&mut probe).now_or_never().is_none(), "bytes left before the driven future yielded");
            assert_eq!(lock(&io.shared).buf.len(), 11);
            // Waiting for them yields, and they are written out then.
            b.read_exact(&mut seen).await?;
            Ok::<_, io::Error>(())
        })
        .await?;
        assert_eq!(&seen, b"hello world");
        Ok(())
    }

    /// Once written out, a connection holds no buffer; its thread keeps it for the next connection that writes.
    #[tokio::test]
    async fn a_written_out_buffer_goes_to_the_thread_not_the_connection() -> Result<(), Box<dyn std::error::Error>> {
        let (a, mut b) = tokio::io::duplex(LIMIT * 4);
        let (mut io, cork) = super::cork(a);
        let mut seen = [0u8; 5];
        drive(cork, async {
            io.write_all(b"hello").await?;
            b.read_exact(&mut seen).await?;
            // Written out while the driven future waited for the peer's read.
            assert_eq!(lock(&io.shared).buf.capacity(), 0, "an idle connection holds a buffer");
            Ok::<_, io::Error>(())
        })
        .await?;
        let spare = SPARE.take();
        assert!(spare.capacity() >= LIMIT && spare.is_empty(), "the thread kept no buffer");
        // The next write on this thread takes it instead of allocating.
        let (c, _d) = tokio::io::duplex(LIMIT * 4);
        let (mut other, _cork) = super::cork(c);
        let kept = spare.as_ptr();
        SPARE.set(spare);
        other.write_all(b"x").await?;
        assert_eq!(lock(&other.shared).buf.as_ptr(), kept);
        Ok(())
    }

    /// More than LIMIT bytes in one turn are written through instead of gathered without bound.
    #[tokio::test]
    async fn a_full_buffer_is_written_out_without_waiting_for_the_turn() -> Result<(), Box<dyn std::error::Error>> {
        let (a, mut b) = tokio::io::duplex(LIMIT * 4);
        let (mut io, cork) = super::cork(a);
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            b.read_to_end(&mut got).await.map(|_| got)
        });
        let chunk = vec![7u8; 64 * 1024];
        drive(cork, async {
            for _ in 0..(LIMIT / chunk.len() + 2) {
                io.write_all(&chunk).await?;
            }
            // Past the limit, the buffer never holds more than LIMIT plus one write.
            let held = lock(&io.shared).buf.len();
            assert!(held <= LIMIT + chunk.len(), "buffer holds {held} bytes");
            io.shutdown().await
        })
        .await?;
        let got = reader.await??;
        assert_eq!(got.len(), (LIMIT / chunk.len() + 2) * chunk.len());
        assert!(got.iter().all(|&x| x == 7));
        Ok(())
    }
}
