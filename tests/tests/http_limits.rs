//! The HTTP listener under hostile clients, with the default limits: slow-header connections are
//! capped per address and dropped at the header deadline while honest requests and trainers go
//! on; blobs are streamed and checked against their name; the listener refuses a public address
//! unless told.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tributary_coordinator::service::{self, ServeOptions, ServerLimits, TlsSource};
use tributary_shared::BlobHash;
use tributary_tests::load::loopback_address;
use tributary_tests::synthetic::Fault;

/// A TCP connection to `server` from the loopback address `local`.
async fn connect_from(local: std::net::IpAddr, server: SocketAddr) -> tokio::net::TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::new(local, 0)).unwrap();
    socket.connect(server).await.unwrap()
}

/// True once the server has closed `stream` (a read returns end of file or an error).
async fn closed_by_server(stream: &mut tokio::net::TcpStream) -> bool {
    let mut buffer = [0u8; 1024];
    loop {
        match stream.read(&mut buffer).await {
            Ok(0) | Err(_) => return true,
            Ok(_) => continue,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_header_clients_are_capped_and_dropped_while_honest_work_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let config = parse(&experiment_toml("slowloris", 3, 1000, 4, 4, 4, 4));
    let running = start(dir.path(), Some(config), vec![]).await;
    let http = running.http_addr.unwrap();
    let limits = tributary_coordinator::http::HttpLimits::default();
    let before = rss_bytes();

    // 1,000 connections from four addresses, each sending half a request line and then nothing.
    let mut attackers = Vec::new();
    for index in 0..1000u32 {
        let local = loopback_address((index % 4) * 16 + 100_000);
        let mut stream = connect_from(local, http).await;
        let _ = stream.write_all(b"GET /healthz HTT").await;
        attackers.push(stream);
    }
    // Beyond the per-address cap they are closed at once, and counted.
    let refused = 1000 - 4 * limits.connections_per_address as u64;
    wait_for_limit(&running, "http_connections_per_address", refused).await;

    // An honest client on another address is served meanwhile.
    let page = tokio::time::timeout(Duration::from_secs(5), http_get(http, "/healthz"))
        .await
        .expect("an honest request is served during the attack");
    assert!(page.ends_with("ok\n"), "{page}");

    // Honest trainers run their rounds.
    let mut handles = Vec::new();
    for seed in 0..4u64 {
        let options = options(running.addr, 600 + seed, Fault::None, None);
        handles.push(spawn_trainer(&running.fingerprint, options));
    }
    for handle in handles {
        let report = tokio::time::timeout(Duration::from_secs(120), handle)
            .await
            .expect("honest trainer finished in time")
            .unwrap()
            .unwrap();
        assert!(report.finished);
    }

    // Every slow-header connection is closed by the header deadline.
    let deadline = limits.header_read_timeout + Duration::from_secs(10);
    for stream in &mut attackers {
        assert!(
            tokio::time::timeout(deadline, closed_by_server(stream))
                .await
                .unwrap_or(false),
            "a slow-header connection outlived the header deadline"
        );
    }
    let grown = rss_bytes().saturating_sub(before);
    assert!(
        grown < 128 << 20,
        "memory grew by {} MiB under slow-header clients",
        grown >> 20
    );
    running.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blobs_stream_whole_and_a_corrupt_file_is_never_served_as_whole() {
    let dir = tempfile::tempdir().unwrap();
    // 100,000 parameters: the adapter is a blob file.
    let config = parse(&experiment_toml("stream", 1, 100_000, 1, 1, 1, 1));
    let running = start(dir.path(), Some(config), vec![]).await;
    let http = running.http_addr.unwrap();
    let adapter = current_adapter(&running).await;
    let (status, body) = http_get_bytes(http, &format!("/hub/adapters/{adapter}")).await;
    assert!(status.contains("200"), "{status}");
    assert_eq!(BlobHash::of(&body), adapter);
    assert!(body.len() > 64 * 1024);

    // Flip one byte of the stored file: the response is cut short, not served as whole.
    let hex = adapter.to_hex();
    let path = dir.path().join("blobs").join(&hex[..2]).join(&hex);
    let mut bytes = std::fs::read(&path).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    std::fs::write(&path, &bytes).unwrap();
    let mut stream = tokio::net::TcpStream::connect(http).await.unwrap();
    stream
        .write_all(format!("GET /hub/adapters/{adapter} HTTP/1.0\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut response = Vec::new();
    let _ = stream.read_to_end(&mut response).await;
    // hyper writes the header with the first body bytes, so a body that fails before anything
    // was flushed closes the connection with no header at all: also not served whole.
    if let Some(split) = response.windows(4).position(|w| w == b"\r\n\r\n") {
        assert!(
            response.len() - (split + 4) < bytes.len(),
            "a corrupt blob was sent whole"
        );
    }

    // Unknown hashes and non-hashes are refused.
    let (status, _) = http_get_bytes(http, &format!("/hub/adapters/{}", BlobHash::of(b"x"))).await;
    assert!(status.contains("404"), "{status}");
    let (status, _) = http_get_bytes(http, "/hub/adapters/nothex").await;
    assert!(status.contains("400"), "{status}");
    running.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_public_http_address_needs_an_explicit_flag() {
    let dir = tempfile::tempdir().unwrap();
    let config = parse(&experiment_toml("public", 1, 100, 1, 1, 1, 1));
    let error = service::start(ServeOptions {
        data_dir: dir.path().to_owned(),
        listen: "127.0.0.1:0".parse().unwrap(),
        experiment: Some(config),
        http: Some("0.0.0.0:0".parse().unwrap()),
        http_public: false,
        tls: TlsSource::SelfSigned {
            names: vec!["localhost".into()],
        },
        base_model: None,
        lease: Default::default(),
        limits: ServerLimits::default(),
    })
    .await
    .expect_err("a public http address is refused without --http-public");
    assert!(format!("{error:#}").contains("--http-public"), "{error:#}");
}
