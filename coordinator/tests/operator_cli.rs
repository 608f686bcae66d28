//! `tributary-coordinator pause|resume|throttle --http A,B,…` as an operator runs it against a
//! cluster: the signed order goes to each address in turn, past nodes that stand by, until the
//! leader takes it.

use std::io::{Read as _, Write as _};
use std::net::TcpListener;
use std::process::Command;

/// A one-request HTTP server that answers `status` and `body`, and hands back the request.
fn answer_once(
    status: &'static str,
    body: &'static str,
) -> (String, std::thread::JoinHandle<String>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let served = std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().unwrap();
        let mut request = Vec::new();
        let mut buffer = [0u8; 4096];
        // Headers, then the announced body.
        loop {
            let n = stream.read(&mut buffer).unwrap();
            request.extend_from_slice(&buffer[..n]);
            let text = String::from_utf8_lossy(&request).into_owned();
            if let Some(at) = text.find("\r\n\r\n") {
                let length: usize = text
                    .lines()
                    .find_map(|line| line.strip_prefix("Content-Length: "))
                    .and_then(|n| n.trim().parse().ok())
                    .unwrap_or(0);
                if request.len() >= at + 4 + length {
                    break;
                }
            }
            if n == 0 {
                break;
            }
        }
        write!(
            stream,
            "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
             Connection: close\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        String::from_utf8_lossy(&request).into_owned()
    });
    (addr, served)
}

fn operator_key(dir: &std::path::Path) -> std::path::PathBuf {
    let key = tributary_shared::identity::Identity::generate(&mut rand::rngs::OsRng);
    let path = dir.join("operator.key");
    std::fs::write(&path, key.secret_hex()).unwrap();
    path
}

fn run(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_tributary-coordinator"))
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn an_order_passes_a_standby_and_an_unreachable_node_and_reaches_the_leader() {
    let dir = tempfile::tempdir().unwrap();
    let key = operator_key(dir.path());
    let (standby, standby_saw) = answer_once(
        "503 Service Unavailable",
        r#"{"error":"this node stands by: send operator orders to the leader","leader":null}"#,
    );
    let (leader, leader_saw) = answer_once("200 OK", r#"{"duty_ppm":0,"trainers":3}"#);
    // A port nothing listens on: a node that is down.
    let down = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .to_string();
    let nodes = format!("{down},http://{standby}/,{leader}");
    let output = run(&[
        "pause",
        "--http",
        &nodes,
        "--operator-key",
        key.to_str().unwrap(),
    ]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout} {}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("\"trainers\":3"), "{stdout}");
    // Both nodes that answered got the same signed order.
    let (standby_saw, leader_saw) = (standby_saw.join().unwrap(), leader_saw.join().unwrap());
    let body = |request: &str| request.split("\r\n\r\n").nth(1).unwrap_or("").to_owned();
    assert!(body(&leader_saw).contains("\"duty_ppm\":0"), "{leader_saw}");
    assert_eq!(body(&standby_saw), body(&leader_saw));
}

#[test]
fn a_refusal_other_than_standing_by_stops_at_that_node() {
    let dir = tempfile::tempdir().unwrap();
    let key = operator_key(dir.path());
    let (leader, _saw) = answer_once("403 Forbidden", r#"{"error":"not the operator's key"}"#);
    // Never reached: the 403 ends the attempt.
    let (other, _) = answer_once("200 OK", "{}");
    let nodes = format!("{leader},{other}");
    let output = run(&[
        "resume",
        "--http",
        &nodes,
        "--operator-key",
        key.to_str().unwrap(),
    ]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("403") && stderr.contains(&leader),
        "{stderr}"
    );
    // Nothing listens anywhere: each address is named in the error.
    let (standby, _) = answer_once(
        "503 Service Unavailable",
        r#"{"error":"this node stands by: send operator orders to the leader"}"#,
    );
    let down = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .to_string();
    let output = run(&[
        "resume",
        "--http",
        &format!("{standby},{down}"),
        "--operator-key",
        key.to_str().unwrap(),
    ]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("no node took the order"), "{stderr}");
    assert!(
        stderr.contains(&format!("{standby}: stands by")) && stderr.contains(&down),
        "{stderr}"
    );
}
