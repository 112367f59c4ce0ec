//! Length-delimited protobuf frames (a varint length, then the message) with a size cap.
//!
//! Both libp2p protocols speak in these frames. The cap is checked on the declared length
//! before any byte of the body is read, so a hostile peer cannot make the node allocate more
//! than the cap.

use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use rba_proto::Message;

/// Default largest frame: 4 MiB (blob chunks are 256 KiB; a `Has` of 10 000 digests is ~1 MiB).
pub const DEFAULT_MAX_FRAME: usize = 4 << 20;
/// Bytes of blob data per `Chunk` frame.
pub const CHUNK_BYTES: usize = 256 << 10;

/// Why a frame could not be read.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The connection failed or closed in the middle of a frame.
    #[error("connection: {0}")]
    Io(#[from] std::io::Error),
    /// The declared length exceeds the cap.
    #[error("frame of {declared} bytes exceeds the {max}-byte limit")]
    TooLarge {
        /// Declared length.
        declared: u64,
        /// The cap.
        max: usize,
    },
    /// The length prefix or the body is not valid protobuf.
    #[error("malformed frame: {0}")]
    Malformed(String),
}

impl FrameError {
    /// The `Error.code` a node answers with.
    pub fn code(&self) -> &'static str {
        match self {
            FrameError::Io(_) => "io",
            FrameError::TooLarge { .. } => "frame_too_large",
            FrameError::Malformed(_) => "malformed_frame",
        }
    }
}

/// Writes one frame and flushes.
pub async fn write_frame<W: AsyncWrite + Unpin>(
    writer: &mut W,
    message: &impl Message,
) -> std::io::Result<()> {
    writer
        .write_all(&message.encode_length_delimited_to_vec())
        .await?;
    writer.flush().await
}

/// Reads one frame; `Ok(None)` on a clean end of stream before the first byte of a frame.
pub async fn read_frame<R: AsyncRead + Unpin, M: Message + Default>(
    reader: &mut R,
    max: usize,
) -> Result<Option<M>, FrameError> {
    let mut length: u64 = 0;
    let mut shift = 0;
    loop {
        let mut byte = [0u8; 1];
        let n = reader.read(&mut byte).await?;
        if n == 0 {
            if shift == 0 {
                return Ok(None);
            }
            return Err(FrameError::Io(std::io::ErrorKind::UnexpectedEof.into()));
        }
        length |= u64::from(byte[0] & 0x7f) << shift;
        if byte[0] & 0x80 == 0 {
            break;
        }
        shift += 7;
        if shift >= 64 {
            return Err(FrameError::Malformed("length varint too long".into()));
        }
    }
    if length > max as u64 {
        return Err(FrameError::TooLarge {
            declared: length,
            max,
        });
    }
    let mut body = vec![0u8; length as usize];
    reader.read_exact(&mut body).await?;
    M::decode(body.as_slice())
        .map(Some)
        .map_err(|e| FrameError::Malformed(e.to_string()))
}

#[cfg(test)]
mod tests {
    use rba_proto::rba::v1::{Attach, ClientFrame, client_frame};

    use super::*;

    #[tokio::test]
    async fn round_trip_cap_and_garbage() {
        let frame = ClientFrame {
            frame: Some(client_frame::Frame::Attach(Attach {
                session_id: "s".into(),
                from_seq: 7,
            })),
        };
        let mut buffer = Vec::new();
        write_frame(&mut buffer, &frame).await.unwrap();
        write_frame(&mut buffer, &frame).await.unwrap();
        let mut reader = buffer.as_slice();
        for _ in 0..2 {
            let read: Option<ClientFrame> = read_frame(&mut reader, 1024).await.unwrap();
            assert_eq!(read, Some(frame.clone()));
        }
        assert!(
            read_frame::<_, ClientFrame>(&mut reader, 1024)
                .await
                .unwrap()
                .is_none()
        );

        let mut reader = buffer.as_slice();
        let error = read_frame::<_, ClientFrame>(&mut reader, 2)
            .await
            .unwrap_err();
        assert_eq!(error.code(), "frame_too_large");

        let huge = [0xff, 0xff, 0xff, 0xff, 0x0f];
        let error = read_frame::<_, ClientFrame>(&mut huge.as_slice(), 1 << 20)
            .await
            .unwrap_err();
        assert_eq!(error.code(), "frame_too_large");

        let garbage = [3u8, 0xff, 0xff, 0xff];
        let error = read_frame::<_, ClientFrame>(&mut garbage.as_slice(), 1024)
            .await
            .unwrap_err();
        assert_eq!(error.code(), "malformed_frame");

        let truncated = [10u8, 1, 2];
        let error = read_frame::<_, ClientFrame>(&mut truncated.as_slice(), 1024)
            .await
            .unwrap_err();
        assert_eq!(error.code(), "io");
    }
}
