//! Shared helpers: a real server on loopback (port 0) over a temp directory, and real tonic
//! clients.
#![allow(dead_code)]

use rba_cache_server::auth::Access;
use rba_cache_server::config::TokenConfig;
use rba_cache_server::resource_name::{self, Compressor};
use rba_cache_server::{Config, RunningServer, Server};
use rba_cas::{Digest, DigestFunction};
use rba_proto::bytestream::byte_stream_client::ByteStreamClient;
use rba_proto::bytestream::{ReadRequest, WriteRequest};
use rba_proto::longrunning::operations_client::OperationsClient;
use rba_proto::reapi::action_cache_client::ActionCacheClient;
use rba_proto::reapi::capabilities_client::CapabilitiesClient;
use rba_proto::reapi::content_addressable_storage_client::ContentAddressableStorageClient;
use rba_proto::reapi::execution_client::ExecutionClient;
use rba_proto::reapi::{self, batch_update_blobs_request};
use tonic::transport::Channel;
use tonic::{Request, Status};

pub const RW_TOKEN: &str = "read-write-token-0123";
pub const RO_TOKEN: &str = "read-only-token-0123";

/// A server with its data directory.
pub struct TestServer {
    pub server: Option<RunningServer>,
    pub dir: tempfile::TempDir,
    pub config: Config,
}

pub fn test_config(dir: &std::path::Path) -> Config {
    let mut config = Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        metrics_listen: Some("127.0.0.1:0".parse().unwrap()),
        data_dir: dir.to_path_buf(),
        ..Config::default()
    };
    config.store.fsync = false;
    config.store.max_bytes = 1 << 30;
    // Cache-only unless a test asks for execution (`TestServer::start_executing`).
    config.execution.enabled = false;
    config
}

/// Turns the Execution service on (2 workers).
pub fn with_execution(mut config: Config) -> Config {
    config.execution.enabled = true;
    config.execution.workers = Some(2);
    config
}

pub fn with_tokens(mut config: Config) -> Config {
    config.auth.tokens = vec![
        TokenConfig {
            name: "rw".into(),
            token: RW_TOKEN.into(),
            access: Access::ReadWrite,
            tenants: vec![],
        },
        TokenConfig {
            name: "ro".into(),
            token: RO_TOKEN.into(),
            access: Access::ReadOnly,
            tenants: vec![],
        },
    ];
    config
}

impl TestServer {
    pub async fn start() -> TestServer {
        Self::start_with(|c| c).await
    }

    pub async fn start_with(adjust: impl FnOnce(Config) -> Config) -> TestServer {
        let dir = tempfile::tempdir().unwrap();
        let config = adjust(test_config(dir.path()));
        let server = Server::spawn(config.clone()).await.expect("server starts");
        TestServer {
            server: Some(server),
            dir,
            config,
        }
    }

    /// A server with the Execution service; fails if the sandbox cannot be set up.
    pub async fn start_executing() -> TestServer {
        Self::start_executing_with(|c| c).await
    }

    pub async fn start_executing_with(adjust: impl FnOnce(Config) -> Config) -> TestServer {
        let server = Self::start_with(|c| adjust(with_execution(c))).await;
        assert!(
            server.running().state.execution_enabled(),
            "the executor did not start (see the warning above): run .ci/setup.d/sandbox.sh"
        );
        server
    }

    pub fn running(&self) -> &RunningServer {
        self.server.as_ref().unwrap()
    }

    pub async fn channel(&self) -> Channel {
        Channel::from_shared(self.running().url())
            .unwrap()
            .connect()
            .await
            .expect("connects")
    }

    pub async fn clients(&self) -> Clients {
        Clients::new(self.channel().await)
    }

    pub async fn restart(&mut self) {
        self.server
            .take()
            .unwrap()
            .shutdown()
            .await
            .expect("clean shutdown");
        let config = self.config.clone();
        self.server = Some(Server::spawn(config).await.expect("server restarts"));
    }

    /// Shuts the server down (clean drain and flush).
    pub async fn shutdown(mut self) {
        self.server
            .take()
            .unwrap()
            .shutdown()
            .await
            .expect("clean shutdown");
    }

    pub fn blobs(&self) -> &rba_cas::BlobStore {
        &self
            .running()
            .embedded
            .as_ref()
            .expect("an embedded store")
            .blobs
    }
}

/// One client per service over one channel.
#[derive(Clone)]
pub struct Clients {
    pub cas: ContentAddressableStorageClient<Channel>,
    pub ac: ActionCacheClient<Channel>,
    pub bs: ByteStreamClient<Channel>,
    pub caps: CapabilitiesClient<Channel>,
    pub exec: ExecutionClient<Channel>,
    pub ops: OperationsClient<Channel>,
}

impl Clients {
    pub fn new(channel: Channel) -> Self {
        let limit = 64 << 20;
        Clients {
            cas: ContentAddressableStorageClient::new(channel.clone())
                .max_decoding_message_size(limit)
                .max_encoding_message_size(limit),
            ac: ActionCacheClient::new(channel.clone()),
            bs: ByteStreamClient::new(channel.clone()).max_decoding_message_size(limit),
            caps: CapabilitiesClient::new(channel.clone()),
            exec: ExecutionClient::new(channel.clone()).max_decoding_message_size(limit),
            ops: OperationsClient::new(channel),
        }
    }

    /// Uploads with BatchUpdateBlobs and asserts success.
    pub async fn put(&mut self, instance: &str, function: DigestFunction, data: &[u8]) -> Digest {
        let digest = function.digest_of(data);
        let response = self
            .cas
            .batch_update_blobs(reapi::BatchUpdateBlobsRequest {
                instance_name: instance.into(),
                requests: vec![batch_update_blobs_request::Request {
                    digest: Some(digest.to_reapi()),
                    data: data.to_vec(),
                    compressor: 0,
                }],
                digest_function: function.to_reapi() as i32,
            })
            .await
            .expect("batch update")
            .into_inner();
        assert_eq!(
            response.responses[0].status.as_ref().unwrap().code,
            0,
            "{response:?}"
        );
        digest
    }

    /// Uploads with BatchUpdateBlobs as the holder of `token` and asserts success.
    pub async fn put_as(&mut self, token: &str, instance: &str, data: &[u8]) -> Digest {
        let digest = DigestFunction::Sha256.digest_of(data);
        let request = reapi::BatchUpdateBlobsRequest {
            instance_name: instance.into(),
            requests: vec![batch_update_blobs_request::Request {
                digest: Some(digest.to_reapi()),
                data: data.to_vec(),
                compressor: 0,
            }],
            digest_function: DigestFunction::Sha256.to_reapi() as i32,
        };
        let response = self
            .cas
            .batch_update_blobs(bearer(request, token))
            .await
            .expect("batch update")
            .into_inner();
        assert_eq!(
            response.responses[0].status.as_ref().unwrap().code,
            0,
            "{response:?}"
        );
        digest
    }

    /// Reads a whole blob with ByteStream as the holder of `token`.
    pub async fn read_as(
        &mut self,
        token: &str,
        instance: &str,
        digest: &Digest,
    ) -> Result<Vec<u8>, Status> {
        let request = ReadRequest {
            resource_name: resource_name::read_name(instance, digest, Compressor::Identity),
            read_offset: 0,
            read_limit: 0,
        };
        let mut stream = self.bs.read(bearer(request, token)).await?.into_inner();
        let mut data = Vec::new();
        while let Some(message) = stream.message().await? {
            data.extend_from_slice(&message.data);
        }
        Ok(data)
    }

    /// Writes a blob with ByteStream in chunks.
    pub async fn write(
        &mut self,
        instance: &str,
        digest: &Digest,
        wire: &[u8],
        compressor: Compressor,
        chunk: usize,
    ) -> Result<i64, Status> {
        let name = resource_name::write_name(
            instance,
            &uuid::Uuid::new_v4().to_string(),
            digest,
            compressor,
        );
        self.write_named(&name, wire, chunk, true).await
    }

    pub async fn write_named(
        &mut self,
        name: &str,
        wire: &[u8],
        chunk: usize,
        finish: bool,
    ) -> Result<i64, Status> {
        let requests = write_requests(name, wire, 0, chunk, finish);
        self.bs
            .write(tokio_stream::iter(requests))
            .await
            .map(|r| r.into_inner().committed_size)
    }

    /// Reads a whole resource.
    pub async fn read(&mut self, name: &str, offset: i64, limit: i64) -> Result<Vec<u8>, Status> {
        let mut stream = self
            .bs
            .read(ReadRequest {
                resource_name: name.into(),
                read_offset: offset,
                read_limit: limit,
            })
            .await?
            .into_inner();
        let mut data = Vec::new();
        while let Some(message) = stream.message().await? {
            data.extend_from_slice(&message.data);
        }
        Ok(data)
    }
}

pub fn write_requests(
    name: &str,
    wire: &[u8],
    start: usize,
    chunk: usize,
    finish: bool,
) -> Vec<WriteRequest> {
    let mut requests = Vec::new();
    let mut offset = start;
    loop {
        let end = (offset + chunk).min(wire.len());
        let last = end == wire.len();
        requests.push(WriteRequest {
            resource_name: if requests.is_empty() {
                name.to_string()
            } else {
                String::new()
            },
            write_offset: offset as i64,
            finish_write: last && finish,
            data: wire[offset..end].to_vec(),
        });
        offset = end;
        if last {
            return requests;
        }
    }
}

pub fn bearer<T>(message: T, token: &str) -> Request<T> {
    let mut request = Request::new(message);
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    request
}

/// Deterministic pseudo-random bytes.
pub fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 24) as u8
        })
        .collect()
}

/// GET over plain HTTP/1.0 (the metrics endpoint).
pub async fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    response
}

/// Files left in the store's temp directories (must be none once uploads are done), not
/// counting each process's lock file.
pub fn temp_files(dir: &std::path::Path) -> usize {
    let Ok(process_dirs) = std::fs::read_dir(dir.join("tmp")) else {
        return 0;
    };
    process_dirs
        .map(|d| d.unwrap().path())
        .map(|dir| {
            std::fs::read_dir(dir)
                .map(|files| {
                    files
                        .filter(|f| f.as_ref().unwrap().file_name() != ".lock")
                        .count()
                })
                .unwrap_or(1)
        })
        .sum()
}
