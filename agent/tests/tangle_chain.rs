//! Tangle end to end on a local EVM chain (issue 16): the real `rba tangle run` binary against
//! a real EVM node, with nothing synthetic between a customer's transaction and the posted
//! result.
//!
//! - anvil (Foundry's, installed by `.ci/setup.d/anvil.sh` from the npm registry, the version
//!   that dumped the state) on loopback, started from the blueprint SDK's saved chain state,
//!   which has Tangle core (tnt-core) deployed and an operator staked;
//! - our `BuildAgentServiceManager` deployed from `rba_contracts`' bytecode, a blueprint created
//!   with it as its service manager (the definition is the SDK's own `createBlueprint` call from
//!   the state's deployment log, with our manager and `blueprint.json`'s jobs and pay-per-call
//!   pricing), the operator registered by the binary in registration mode, a service requested
//!   by a customer account and approved by the operator;
//! - the node started as the Blueprint Manager starts it (environment variables, `--test-mode`
//!   because there is no manager bridge here), fetching zips from a loopback HTTPS server whose
//!   test CA it trusts through `SSL_CERT_FILE`;
//! - the customer submits job 0 paying its price, follows the session's WebSocket with its
//!   signature (no token of the node), reads the `BuildResult` back from the chain; the manager
//!   accepted it (`JobResultPosted`), Tangle core paid the operator its share, the node's QoS
//!   heartbeat is in the status registry; a malformed input is refused on chain by the manager,
//!   a missing zip is answered with an error result; jobs 2–5 run on chain; SIGTERM with job 1
//!   in flight still posts its result before the node exits.
//!
//! It prints the figures of the issue: `JobSubmitted` → first log line on the WebSocket, build
//! end → result final on chain, and the test's wall time.
#![cfg(feature = "tangle")]

mod common;

use std::collections::HashMap;
use std::io::{BufRead as _, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use alloy_primitives::{Address, Bytes, U256};
use alloy_sol_types::{SolCall as _, SolEvent as _, SolValue as _};
use blueprint_sdk::alloy::network::{EthereumWallet, TransactionBuilder as _};
use blueprint_sdk::alloy::providers::{Provider as _, ProviderBuilder};
use blueprint_sdk::alloy::rpc::types::{Filter, TransactionRequest};
use blueprint_sdk::alloy::signers::local::PrivateKeySigner;
use blueprint_sdk::clients::tangle::contracts::{ITangle, ITangleTypes};
use blueprint_sdk::clients::tangle::{
    JobSubmissionResult, ServiceRequestParams, TangleClient, TangleClientConfig, TangleSettings,
};
use blueprint_sdk::crypto::BytesEncoding as _;
use blueprint_sdk::crypto::k256::{K256Ecdsa, K256SigningKey};
use blueprint_sdk::keystore::backends::Backend as _;
use blueprint_sdk::keystore::{Keystore, KeystoreConfig};
use futures::StreamExt as _;
use rba_agent::tangle::jobs::{BuildResult, ExecutionResult};
use rba_contracts::{encode_execute_inputs, encode_job_inputs};

/// The addresses of Tangle core in the SDK's saved state (its deployment order fixes them; the
/// SDK's own harness, blueprint-anvil-testing-utils `tangle.rs`, uses the same).
const TANGLE: &str = "0x0165878A594ca255338adfa4d48449f69242Eb8F";
const STAKING: &str = "0xDc64a140Aa3E981100a9becA4E685f962f0cF6C9";
const STATUS_REGISTRY: &str = "0x2bdCC0de6bE1f7D2ee689a0342D76F52E8EFABa3";
/// anvil's well-known dev accounts: 0 deployed Tangle core and owns our blueprint, 1 is the
/// operator staked in the saved state, 3 is our customer.
const DEPLOYER_KEY: &str = "ac0974bec39a17e36ba4a6b4d238ff944bacb478cbed5efcae784d7bf4f2ff80";
const OPERATOR_KEY: &str = "59c6995e998f97a5a0044966f0945389dc9e86dae88c7a8412f4603b6b78690d";
const CUSTOMER_KEY: &str = "7c852118294e51e653712a81e05800f419141751be58f605c371e15141b007a6";
/// The price of a job call (wei), the blueprint's event rate (as in `blueprint.json`); the
/// customer pays it with the call.
const JOB_PRICE: u64 = 1_000_000_000_000_000;
/// tnt-core's `Types.PricingModel.EventDriven` (PayOnce 0, Subscription 1, EventDriven 2).
const PRICING_EVENT_DRIVEN: u8 = 2;

alloy_sol_types::sol! {
    function setJobPrice(uint8 job, uint256 price) external;
    function getLastHeartbeat(uint64 serviceId, address operator) external view returns (uint256);
    function isRegisteredOperator(address operator) external view returns (bool);
    event JobResultPosted(
        uint64 indexed serviceId,
        uint64 indexed jobCallId,
        bytes16 indexed sessionId,
        uint8 job,
        address operator,
        bytes32 outputsHash,
        uint256 payment
    );
}

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The anvil binary `.ci/setup.d/anvil.sh` installed (the platform package of
/// `@foundry-rs/anvil`; its node wrapper would sit between us and the process we stop).
fn anvil_binary() -> PathBuf {
    let scope = repo_root().join("tests/anvil/node_modules/@foundry-rs");
    std::fs::read_dir(&scope)
        .ok()
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok())
        .map(|e| e.path().join("bin/anvil"))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "no anvil under {}: run `bash .ci/setup.d/anvil.sh` (or .ci/setup)",
                scope.display()
            )
        })
}

/// The saved chain state shipped by blueprint-chain-setup-anvil, at the version Cargo.lock pins
/// (`.ci/setup.d/anvil.sh` puts that crate's source in the cargo registry: it is locked as an
/// optional dependency of blueprint-sdk's `testing` feature, which we do not build).
fn snapshot_dir() -> PathBuf {
    const CRATE: &str = "blueprint-chain-setup-anvil";
    let lock = std::fs::read_to_string(repo_root().join("Cargo.lock")).unwrap();
    let version = lock
        .split("[[package]]")
        .find(|p| p.contains(&format!("name = \"{CRATE}\"")))
        .and_then(|p| p.lines().find_map(|l| l.strip_prefix("version = ")))
        .unwrap_or_else(|| panic!("{CRATE} is in Cargo.lock"))
        .trim_matches('"')
        .to_string();
    let cargo_home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap()).join(".cargo"));
    let registry = cargo_home.join("registry/src");
    std::fs::read_dir(&registry)
        .ok()
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok())
        .map(|e| e.path().join(format!("{CRATE}-{version}/snapshots")))
        .find(|p| p.join("localtestnet-state.json").is_file())
        .unwrap_or_else(|| {
            panic!(
                "no {CRATE} {version} under {}: run `bash .ci/setup.d/anvil.sh`",
                registry.display()
            )
        })
}

/// A child process killed (by its pid) when the test ends, also on a panic.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts anvil on a free loopback port from the saved state; returns it and its HTTP URL.
fn start_anvil(state: &Path) -> (Killed, String) {
    let mut child = Command::new(anvil_binary())
        .args(["--host", "127.0.0.1", "--port", "0", "--load-state"])
        .arg(state)
        // As the SDK starts it for this state: no fees, large blocks and contracts.
        .args([
            "--base-fee",
            "0",
            "--gas-price",
            "0",
            "--gas-limit",
            "100000000",
        ])
        .args(["--code-size-limit", "100000"])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("anvil starts");
    let stdout = child.stdout.take().unwrap();
    let child = Killed(child);
    let mut lines = std::io::BufReader::new(stdout).lines();
    let address = loop {
        let line = lines
            .next()
            .expect("anvil prints its address")
            .expect("anvil's output is text");
        if let Some(address) = line.trim().strip_prefix("Listening on ") {
            break address.trim().to_string();
        }
    };
    // Keep draining its output so it never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    (child, address)
}

fn signer(key: &str) -> PrivateKeySigner {
    key.parse().unwrap()
}

fn settings(blueprint_id: u64, service_id: Option<u64>) -> TangleSettings {
    TangleSettings {
        blueprint_id,
        service_id,
        tangle_contract: TANGLE.parse().unwrap(),
        staking_contract: STAKING.parse().unwrap(),
        status_registry_contract: STATUS_REGISTRY.parse().unwrap(),
    }
}

fn key_store(keystore: &Keystore, key: &str) {
    let secret = hex::decode(key).unwrap();
    let signing_key = K256SigningKey::from_bytes(&secret).unwrap();
    keystore.insert::<K256Ecdsa>(&signing_key).unwrap();
}

/// The SDK's Tangle client acting as the account of `key` (in-memory keystore).
async fn client(rpc: &str, key: &str, blueprint_id: u64, service_id: Option<u64>) -> TangleClient {
    let config = TangleClientConfig::new(
        reqwest::Url::parse(&format!("http://{rpc}")).unwrap(),
        reqwest::Url::parse(&format!("ws://{rpc}")).unwrap(),
        "memory://",
        settings(blueprint_id, service_id),
    )
    .test_mode(true);
    let keystore = Keystore::new(KeystoreConfig::new().in_memory(true)).unwrap();
    key_store(&keystore, key);
    TangleClient::with_keystore(config, keystore).await.unwrap()
}

/// Sends a transaction from `key` and waits for its receipt; returns the receipt.
async fn send(
    rpc: &str,
    key: &str,
    tx: TransactionRequest,
) -> blueprint_sdk::alloy::rpc::types::TransactionReceipt {
    let provider = ProviderBuilder::new()
        .wallet(EthereumWallet::from(signer(key)))
        .connect(&format!("http://{rpc}"))
        .await
        .unwrap();
    provider
        .send_transaction(tx.gas_limit(30_000_000))
        .await
        .unwrap()
        .get_receipt()
        .await
        .unwrap()
}

async fn view<C: alloy_sol_types::SolCall>(rpc: &str, to: Address, call: C) -> C::Return {
    let provider = ProviderBuilder::new()
        .connect(&format!("http://{rpc}"))
        .await
        .unwrap();
    let out = provider
        .call(
            TransactionRequest::default()
                .to(to)
                .input(call.abi_encode().into()),
        )
        .await
        .unwrap();
    C::abi_decode_returns(&out).unwrap()
}

/// The blueprint definition the SDK's deployment created blueprint 0 with (a definition this
/// tnt-core accepts), with our manager and, from the repository's `blueprint.json` (what
/// `cargo tangle blueprint deploy` reads), our name, jobs and pricing.
fn blueprint_definition(snapshots: &Path, manager: Address) -> ITangleTypes::BlueprintDefinition {
    let broadcast: serde_json::Value = serde_json::from_slice(
        &std::fs::read(snapshots.join("localtestnet-broadcast.json")).unwrap(),
    )
    .unwrap();
    let selector = hex::encode(ITangle::createBlueprintCall::SELECTOR);
    let input = broadcast["transactions"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|t| t["transaction"]["input"].as_str())
        .find(|input| input.trim_start_matches("0x").starts_with(&selector))
        .expect("the deployment log creates a blueprint");
    let call = ITangle::createBlueprintCall::abi_decode(
        &hex::decode(input.trim_start_matches("0x")).unwrap(),
    )
    .unwrap();
    let ours: serde_json::Value =
        serde_json::from_slice(&std::fs::read(repo_root().join("blueprint.json")).unwrap())
            .unwrap();
    let jobs = ours["jobs"].as_array().unwrap();
    assert_eq!(
        jobs.len(),
        rba_contracts::Job::ALL.len(),
        "blueprint.json has one job per job index"
    );
    assert_eq!(ours["config"]["pricing"], "event_driven");
    assert_eq!(ours["config"]["event_rate"].as_u64(), Some(JOB_PRICE));
    let mut definition = call.definition;
    definition.manager = manager;
    definition.metadata.name = ours["metadata"]["name"].as_str().unwrap().into();
    // Pay per job call: the customer sends the job's event rate with `submitJob`, and Tangle
    // core shares it out to the operator when the result is in.
    definition.config.pricing = PRICING_EVENT_DRIVEN;
    definition.config.eventRate = U256::from(JOB_PRICE);
    definition.jobs = jobs
        .iter()
        .map(|job| ITangleTypes::JobDefinition {
            name: job["name"].as_str().unwrap().into(),
            description: job["description"].as_str().unwrap_or_default().into(),
            metadataUri: String::new(),
            paramsSchema: Bytes::new(),
            resultSchema: Bytes::new(),
        })
        .collect();
    definition
}

/// The zip of a fixture directory (without `target/`), paths relative to it.
fn zip_dir(root: &Path) -> Vec<u8> {
    use zip::write::SimpleFileOptions;
    let mut writer = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let name = path
                .strip_prefix(root)
                .unwrap()
                .to_string_lossy()
                .to_string();
            if path.is_dir() {
                if name != "target" {
                    stack.push(path);
                }
            } else {
                writer
                    .start_file(name, SimpleFileOptions::default())
                    .unwrap();
                writer.write_all(&std::fs::read(&path).unwrap()).unwrap();
            }
        }
    }
    writer.finish().unwrap().into_inner()
}

/// A loopback HTTPS server answering `GET /NAME` with `zips[NAME]`, with a certificate for
/// 127.0.0.1 signed by a test CA; returns its port and the CA's PEM.
async fn https_server(zips: HashMap<String, Vec<u8>>) -> (u16, String) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["127.0.0.1".into()])
        .unwrap()
        .signed_by(&key, &issuer)
        .unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let zips = Arc::new(zips);
    tokio::spawn(async move {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let (acceptor, zips) = (acceptor.clone(), Arc::clone(&zips));
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let mut request = Vec::new();
                let mut buf = [0u8; 4096];
                while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                    match tls.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => request.extend_from_slice(&buf[..n]),
                    }
                }
                let request = String::from_utf8_lossy(&request);
                let name = request
                    .split_whitespace()
                    .nth(1)
                    .unwrap_or_default()
                    .trim_start_matches('/');
                let Some(body) = zips.get(name) else {
                    let _ = tls
                        .write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                        .await;
                    return;
                };
                let head = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: application/zip\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                );
                let _ = tls.write_all(head.as_bytes()).await;
                let _ = tls.write_all(body).await;
                let _ = tls.shutdown().await;
            });
        }
    });
    (port, ca.pem())
}

/// `rba tangle run` as the Blueprint Manager starts it: the blueprint environment in variables,
/// `--test-mode` (no manager bridge here), loopback listeners.
fn rba_tangle(rpc: &str, keystore: &Path, data: &Path, blueprint_id: u64) -> Command {
    let mut command = Command::new(assert_cmd::cargo::cargo_bin("rba"));
    command
        .args(["tangle", "run", "--test-mode", "--allow-private-hosts"])
        .args(["--http", "127.0.0.1:0", "--grpc", "off"])
        .args(["--listen", "/ip4/127.0.0.1/tcp/0"])
        .env("BLUEPRINT_ID", blueprint_id.to_string())
        .env("KEYSTORE_URI", keystore)
        .env("DATA_DIR", data)
        .env("HTTP_RPC_URL", format!("http://{rpc}"))
        .env("WS_RPC_URL", format!("ws://{rpc}"))
        .env("TANGLE_CONTRACT", TANGLE)
        .env("STAKING_CONTRACT", STAKING)
        .env("STATUS_REGISTRY_CONTRACT", STATUS_REGISTRY)
        .env_remove("SERVICE_ID")
        .env_remove("REGISTRATION_MODE_ON")
        .env_remove("REGISTRATION_CAPTURE_ONLY")
        .env_remove("REGISTRATION_OUTPUT_PATH")
        .env_remove("RBA_DATA_DIR")
        .env_remove("RBA_CONFIG")
        .env_remove("SSL_CERT_DIR")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    command
}

/// A keystore directory holding the operator's key, as the operator imports it.
fn operator_keystore(dir: &Path) -> PathBuf {
    let keystore = dir.join("keystore");
    key_store(
        &Keystore::new(KeystoreConfig::new().fs_root(&keystore)).unwrap(),
        OPERATOR_KEY,
    );
    keystore
}

/// The node's stderr, echoed, with the lines it prints at start handed over.
fn follow_stderr(child: &mut Child) -> std::sync::mpsc::Receiver<String> {
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr).lines() {
            let Ok(line) = line else { return };
            eprintln!("[rba] {line}");
            let _ = tx.send(line);
        }
    });
    rx
}

/// The session's WebSocket URL for the account of `key`: it signs the session's read message.
fn session_url(http: &str, session_id: &str, key: &str) -> String {
    use blueprint_sdk::alloy::signers::SignerSync as _;
    let message = rba_agent::tangle::session_read_message(session_id);
    let sig = signer(key).sign_message_sync(message.as_bytes()).unwrap();
    format!(
        "ws://{http}/v1/sessions/{session_id}/events?sig=0x{}",
        hex::encode(sig.as_bytes())
    )
}

/// Waits for the result of call `call_id` on chain; returns the bytes and when it was seen.
/// Build job `job` on `zip` (a file of the test's HTTPS server) under `session`, paid at the
/// job's price: what Tangle core answered.
async fn submit_zip_job(
    customer: &TangleClient,
    service_id: u64,
    job: u8,
    https_port: u16,
    zip: &str,
    session: &str,
) -> blueprint_sdk::clients::tangle::Result<JobSubmissionResult> {
    let inputs = encode_job_inputs(
        &format!("https://127.0.0.1:{https_port}/{zip}"),
        session,
        "",
    );
    customer
        .submit_job_with_value(service_id, job, inputs.into(), U256::from(JOB_PRICE))
        .await
}

/// The session's WebSocket once it answers (it appears when the node has imported the zip),
/// retried until `since` is `within` old.
async fn connect_session(
    url: &str,
    since: Instant,
    within: Duration,
) -> tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>> {
    loop {
        match tokio_tungstenite::connect_async(url).await {
            Ok((socket, _)) => return socket,
            Err(e) => {
                assert!(since.elapsed() < within, "no session: {e}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

async fn chain_result(
    customer: &TangleClient,
    service_id: u64,
    call_id: u64,
) -> (Vec<u8>, Instant) {
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let filter = Filter::new()
            .address(TANGLE.parse::<Address>().unwrap())
            .event_signature(ITangle::JobResultSubmitted::SIGNATURE_HASH)
            .topic1(U256::from(service_id))
            .topic2(U256::from(call_id))
            .from_block(0);
        let logs = customer.get_logs(&filter).await.unwrap();
        if let Some(log) = logs.first() {
            let event = ITangle::JobResultSubmitted::decode_log_data(log.data()).unwrap();
            return (event.result.to_vec(), Instant::now());
        }
        assert!(Instant::now() < deadline, "no result for call {call_id}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn job_called_on_chain_is_built_posted_and_paid() {
    let started = Instant::now();
    let scratch = tempfile::tempdir().unwrap();
    let snapshots = snapshot_dir();
    let (_anvil, rpc) = start_anvil(&snapshots.join("localtestnet-state.json"));
    let rpc = rpc.as_str();
    let tangle: Address = TANGLE.parse().unwrap();
    let (operator, customer_address) = (
        signer(OPERATOR_KEY).address(),
        signer(CUSTOMER_KEY).address(),
    );

    // Our service manager, and a blueprint with it.
    let deployed = send(
        rpc,
        DEPLOYER_KEY,
        TransactionRequest::default().with_deploy_code(rba_contracts::service_manager().bytecode),
    )
    .await;
    assert!(deployed.status(), "deploying the manager: {deployed:?}");
    let manager = deployed.contract_address.unwrap();
    let created = send(
        rpc,
        DEPLOYER_KEY,
        TransactionRequest::default().to(tangle).input(
            ITangle::createBlueprintCall {
                definition: blueprint_definition(&snapshots, manager),
            }
            .abi_encode()
            .into(),
        ),
    )
    .await;
    assert!(created.status(), "createBlueprint: {created:?}");
    let blueprint_id = created
        .inner
        .logs()
        .iter()
        .find_map(|l| l.log_decode::<ITangle::BlueprintCreated>().ok())
        .expect("BlueprintCreated")
        .inner
        .blueprintId;
    assert_eq!(
        view(
            rpc,
            tangle,
            ITangle::getJobEventRateCall {
                blueprintId: blueprint_id,
                jobIndex: 0
            }
        )
        .await,
        U256::from(JOB_PRICE),
        "job 0 is priced per call"
    );

    // The operator registers through the binary, as the Blueprint Manager has it do before
    // running it (registration mode, which starts no node); the customer requests a service,
    // the operator approves it.
    let keystore = operator_keystore(scratch.path());
    let data = scratch.path().join("data");
    let mut registration = rba_tangle(rpc, &keystore, &data, blueprint_id)
        .env("REGISTRATION_MODE_ON", "true")
        .args(["--rpc-address", "https://operator.example:7430"])
        .spawn()
        .unwrap();
    let registration_lines = follow_stderr(&mut registration);
    let registration = registration.wait().unwrap();
    let said: Vec<String> = registration_lines.try_iter().collect();
    assert!(registration.success(), "{said:#?}");
    assert!(
        !said.iter().any(|l| l.starts_with("rba: http on")),
        "{said:#?}"
    );
    assert!(view(rpc, manager, isRegisteredOperatorCall { operator }).await);
    let operator_client = client(rpc, OPERATOR_KEY, blueprint_id, None).await;
    assert_eq!(
        operator_client
            .get_operator_rpc_endpoint(blueprint_id, operator)
            .await
            .unwrap(),
        "https://operator.example:7430",
        "customers find the node's address on chain"
    );
    let customer = client(rpc, CUSTOMER_KEY, blueprint_id, None).await;
    let (_, request_id) = customer
        .request_service(ServiceRequestParams::new(
            blueprint_id,
            vec![operator],
            Vec::new(),
            Bytes::new(),
            10_000,
            Address::ZERO,
            U256::ZERO,
        ))
        .await
        .unwrap();
    let approved = operator_client.approve_service(request_id).await.unwrap();
    assert!(approved.success);
    let service_id = customer.service_count().await.unwrap() - 1;
    let service = customer.get_service(service_id).await.unwrap();
    assert_eq!(service.blueprintId, blueprint_id);
    assert_eq!(service.owner, customer_address);
    let chain_ready = started.elapsed();

    // The node, as the Blueprint Manager starts it.
    let slow = common::slow_crate(scratch.path(), 40, 100);
    let (https_port, ca_pem) = https_server(HashMap::from([
        (
            "hello.zip".to_string(),
            zip_dir(&repo_root().join("tests/fixtures/hello")),
        ),
        ("slow.zip".to_string(), zip_dir(&slow)),
    ]))
    .await;
    let ca = scratch.path().join("ca.pem");
    std::fs::write(&ca, ca_pem).unwrap();
    let mut node = rba_tangle(rpc, &keystore, &data, blueprint_id)
        .env("SERVICE_ID", service_id.to_string())
        .env("SSL_CERT_FILE", &ca)
        // The SDK polls every 2 s; polling faster measures the node, not the poll.
        .env("RBA_TANGLE_POLL_INTERVAL_MS", "200")
        .env("RBA_TANGLE_HEARTBEAT_SECS", "1")
        .spawn()
        .unwrap();
    let lines = follow_stderr(&mut node);
    let node = Killed(node);
    let http = loop {
        let line = lines
            .recv_timeout(Duration::from_secs(120))
            .expect("rba tangle run prints its HTTP address");
        if let Some(url) = line.strip_prefix("rba: http on http://") {
            break url.trim().to_string();
        }
    };

    // A malformed input is refused on chain: the manager reverts the call (bad session id).
    let bad = submit_zip_job(
        &customer,
        service_id,
        0,
        https_port,
        "hello.zip",
        "not-a-uuid",
    )
    .await;
    assert!(
        bad.as_ref().map_or(true, |r| !r.tx.success),
        "a bad session id is refused on chain: {bad:?}"
    );
    // So is an unpaid call.
    let unpaid = customer
        .submit_job(
            service_id,
            0,
            encode_job_inputs(
                &format!("https://127.0.0.1:{https_port}/hello.zip"),
                &uuid::Uuid::new_v4().to_string(),
                "",
            )
            .into(),
        )
        .await;
    assert!(
        unpaid.as_ref().map_or(true, |r| !r.tx.success),
        "a call without the job's price is refused on chain: {unpaid:?}"
    );

    // Job 0 (compile), paid.
    let rewards_before = view(
        rpc,
        tangle,
        ITangle::pendingRewards_0Call { account: operator },
    )
    .await;
    let session_id = uuid::Uuid::new_v4().to_string();
    // anvil mines the transaction as it arrives: JobSubmitted is emitted then, while the
    // client is still polling for the receipt, so the latency is counted from the send.
    let submitted_at = Instant::now();
    let submitted = submit_zip_job(
        &customer,
        service_id,
        0,
        https_port,
        "hello.zip",
        &session_id,
    )
    .await
    .unwrap();
    assert!(submitted.tx.success, "{submitted:?}");
    let call_id = submitted.call_id;

    // The customer follows the session (it appears once the node has imported the zip). It
    // holds no token of the node: it signs the session's read message with its account.
    let url = session_url(&http, &session_id, CUSTOMER_KEY);
    let mut socket = connect_session(&url, submitted_at, Duration::from_secs(20)).await;
    let mut first_line = None;
    let mut lines_seen = Vec::new();
    let end = loop {
        let message = tokio::time::timeout(Duration::from_secs(300), socket.next())
            .await
            .expect("events keep coming")
            .expect("the socket stays open until the end")
            .unwrap();
        let tokio_tungstenite::tungstenite::Message::Text(text) = message else {
            continue;
        };
        let event: serde_json::Value = serde_json::from_str(&text).unwrap();
        match event["type"].as_str() {
            Some("log") => {
                first_line.get_or_insert_with(|| submitted_at.elapsed());
                lines_seen.push(event["line"].as_str().unwrap_or_default().to_string());
            }
            _ => break event,
        }
    };
    let build_end = Instant::now();
    // Another account's signature, or none, does not read the customer's session.
    for (url, refused) in [
        (session_url(&http, &session_id, DEPLOYER_KEY), "404"),
        (
            format!("ws://{http}/v1/sessions/{session_id}/events"),
            "401",
        ),
    ] {
        let err = tokio_tungstenite::connect_async(&url).await.unwrap_err();
        assert!(err.to_string().contains(refused), "{url}: {err}");
    }
    assert_eq!(end["type"], "end", "{end}");
    assert_eq!(end["status"], "success", "{end} {lines_seen:#?}");
    let first_line = first_line.expect("log lines before the end");

    // The result on chain.
    let (output, seen_at) = chain_result(&customer, service_id, call_id).await;
    let result = BuildResult::abi_decode(&output).expect("an ABI BuildResult");
    assert_eq!(result.status, 0, "{result:?}");
    assert_eq!(result.exitCode, 0, "{result:?}");
    assert!(result.logDigest.starts_with("blake3:"), "{result:?}");
    assert_ne!(
        result.binaryHash, [0u8; 32],
        "compile has a binary: {result:?}"
    );
    let job_call = customer.get_job_call(service_id, call_id).await.unwrap();
    assert!(job_call.completed, "{job_call:?}");

    // The manager accepted it and credited the payment to the operator.
    let posted = customer
        .get_logs(
            &Filter::new()
                .address(manager)
                .event_signature(JobResultPosted::SIGNATURE_HASH)
                .from_block(0),
        )
        .await
        .unwrap();
    let posted = posted
        .iter()
        .map(|l| JobResultPosted::decode_log_data(l.data()).unwrap())
        .find(|e| e.jobCallId == call_id)
        .expect("JobResultPosted for the call");
    assert_eq!(posted.operator, operator);
    assert_eq!(
        posted.sessionId.as_slice(),
        uuid::Uuid::parse_str(&session_id).unwrap().as_bytes()
    );
    // Tangle core paid the operator its share of the call's price.
    let rewards = view(
        rpc,
        tangle,
        ITangle::pendingRewards_0Call { account: operator },
    )
    .await
        - rewards_before;
    assert!(
        rewards > U256::ZERO && rewards <= U256::from(JOB_PRICE),
        "the operator's share of {JOB_PRICE} wei: {rewards}"
    );

    // The node's QoS heartbeats reach the operator status registry.
    let registry: Address = STATUS_REGISTRY.parse().unwrap();
    let heartbeat_deadline = Instant::now() + Duration::from_secs(20);
    while view(
        rpc,
        registry,
        getLastHeartbeatCall {
            serviceId: service_id,
            operator,
        },
    )
    .await
        == U256::ZERO
    {
        assert!(Instant::now() < heartbeat_deadline, "no heartbeat on chain");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Jobs 2 (lint), 3 (audit) and 4 (check) on chain, submitted together: each gets its
    // result posted (audit needs an advisory database on the node; without one its result is
    // an error that says so, still posted).
    // With them, job 0 on a zip the server does not have: the contract accepts the input, the
    // node answers with an error result, posted like any other.
    let mut calls = Vec::new();
    for (job, zip) in [
        (2u8, "hello.zip"),
        (3, "hello.zip"),
        (4, "hello.zip"),
        (0, "gone.zip"),
    ] {
        let call = submit_zip_job(
            &customer,
            service_id,
            job,
            https_port,
            zip,
            &uuid::Uuid::new_v4().to_string(),
        )
        .await
        .unwrap();
        assert!(call.tx.success, "job {job}: {call:?}");
        calls.push((job, call.call_id));
    }
    for (job, call_id) in calls {
        let (output, _) = chain_result(&customer, service_id, call_id).await;
        let result = BuildResult::abi_decode(&output).expect("an ABI BuildResult");
        if job == 3 {
            assert!(
                result.status == 0 || !result.message.is_empty(),
                "{result:?}"
            );
        } else if job == 0 {
            assert_eq!((result.status, result.exitCode), (1, -1), "{result:?}");
            assert!(result.message.contains("404"), "{result:?}");
        } else {
            assert_eq!(result.status, 0, "job {job}: {result:?}");
        }
    }

    // Job 5 (execute_code) on chain, at the same price: the program's output comes back.
    let exec = customer
        .submit_job_with_value(
            service_id,
            5,
            encode_execute_inputs("fn main() { println!(\"hi from chain\"); }", "", "", 60, 0)
                .into(),
            U256::from(JOB_PRICE),
        )
        .await
        .unwrap();
    assert!(exec.tx.success, "{exec:?}");
    let (output, _) = chain_result(&customer, service_id, exec.call_id).await;
    let executed = ExecutionResult::abi_decode(&output).expect("an ABI ExecutionResult");
    assert!(executed.stdout.contains("hi from chain"), "{executed:?}");
    assert_eq!(executed.status, 0, "{executed:?}");

    // A price on the manager itself cannot be paid through this Tangle core, which forwards no
    // value to the hooks (contracts/README.md, "Payment on a real Tangle deployment"): every
    // call then reverts with InsufficientPayment.
    let price_on_manager = |price: u64| {
        TransactionRequest::default().to(manager).input(
            setJobPriceCall {
                job: 0,
                price: U256::from(price),
            }
            .abi_encode()
            .into(),
        )
    };
    assert!(send(rpc, DEPLOYER_KEY, price_on_manager(1)).await.status());
    let refused = submit_zip_job(
        &customer,
        service_id,
        0,
        https_port,
        "hello.zip",
        &uuid::Uuid::new_v4().to_string(),
    )
    .await;
    let refused = format!("{refused:?}");
    let insufficient = hex::encode(alloy_primitives::keccak256(
        "InsufficientPayment(uint8,uint256,uint256)",
    ));
    assert!(refused.contains(&insufficient[..8]), "{refused}");
    assert!(send(rpc, DEPLOYER_KEY, price_on_manager(0)).await.status());

    // SIGTERM while a job runs: the node takes no new call, the job finishes and its result is
    // posted before the node exits.
    let slow_session = uuid::Uuid::new_v4().to_string();
    let slow_call = submit_zip_job(
        &customer,
        service_id,
        1,
        https_port,
        "slow.zip",
        &slow_session,
    )
    .await
    .unwrap();
    assert!(slow_call.tx.success, "{slow_call:?}");
    let url = session_url(&http, &slow_session, CUSTOMER_KEY);
    let mut socket = connect_session(&url, started, Duration::from_secs(120)).await;
    // Until the test itself runs (it takes 4 s).
    loop {
        let message = tokio::time::timeout(Duration::from_secs(120), socket.next())
            .await
            .expect("events keep coming")
            .expect("the socket stays open")
            .unwrap();
        if let tokio_tungstenite::tungstenite::Message::Text(text) = message {
            let event: serde_json::Value = serde_json::from_str(&text).unwrap();
            assert_eq!(event["type"], "log", "the job is still running: {event}");
            if event["line"]
                .as_str()
                .unwrap_or_default()
                .contains("running 1 test")
            {
                break;
            }
        }
    }
    let mut node = node;
    let status = Command::new("kill")
        .args(["-TERM", &node.0.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let signalled = Instant::now();
    // A call submitted while draining is not taken (it stays pending on chain for another
    // operator or the node's restart).
    let late = submit_zip_job(
        &customer,
        service_id,
        0,
        https_port,
        "hello.zip",
        &uuid::Uuid::new_v4().to_string(),
    )
    .await
    .unwrap();
    let (output, _) = chain_result(&customer, service_id, slow_call.call_id).await;
    let slow_result = BuildResult::abi_decode(&output).expect("an ABI BuildResult");
    assert_eq!(
        slow_result.status, 0,
        "the job in flight finished: {slow_result:?}"
    );
    let exit = loop {
        if let Some(exit) = node.0.try_wait().unwrap() {
            break exit;
        }
        assert!(
            signalled.elapsed() < Duration::from_secs(60),
            "the node exits after draining"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let drained_in = signalled.elapsed();
    assert!(exit.success(), "{exit:?}");
    let late_call = customer
        .get_job_call(service_id, late.call_id)
        .await
        .unwrap();
    assert!(
        !late_call.completed,
        "a call arriving while draining is not taken"
    );
    drop(node);
    eprintln!(
        "figures: SIGTERM with a job in flight -> result posted and node exited in {drained_in:?}"
    );
    eprintln!(
        "figures: operator paid {rewards} wei of {JOB_PRICE}; chain ready (anvil + manager + blueprint + service) {:?}; JobSubmitted -> first log line on the WebSocket {:?}; build end -> result on chain {:?}; whole test {:?}",
        chain_ready,
        first_line,
        seen_at.saturating_duration_since(build_end),
        started.elapsed()
    );
}

/// Registration mode starts no node and no listener, and writes the (empty) registration inputs
/// where the Blueprint Manager reads them; flags this version does not know are not fatal. No
/// chain is needed when only the inputs are captured.
#[test]
fn registration_mode_starts_no_node_and_unknown_flags_are_not_fatal() {
    let scratch = tempfile::tempdir().unwrap();
    let keystore = operator_keystore(scratch.path());
    let data = scratch.path().join("data");
    let output = rba_tangle("127.0.0.1:1", &keystore, &data, 7)
        .args(["--some-future-flag", "--another-one=3", "-q"])
        .env("REGISTRATION_MODE_ON", "true")
        .env("REGISTRATION_CAPTURE_ONLY", "true")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert!(stderr.contains("registration mode"), "{stderr}");
    assert!(!stderr.contains("rba: http on"), "{stderr}");
    assert!(!data.join("rba").exists(), "no node data: {stderr}");
    let inputs = std::fs::read(data.join("registration_inputs.bin")).unwrap();
    assert_eq!(
        inputs,
        Bytes::new().abi_encode(),
        "an ABI-encoded empty bytes"
    );
}
