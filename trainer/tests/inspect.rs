//! `tributary-trainer inspect`, run as a researcher runs it, on a file it supports and on one
//! it does not.

use std::process::Command;

use tributary_trainer::gguf::{Gguf, GgufWriter, Value};

fn inspect(path: &std::path::Path) -> (bool, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_tributary-trainer"))
        .arg("inspect")
        .arg("--model")
        .arg(path)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&output.stdout).into_owned()
        + &String::from_utf8_lossy(&output.stderr);
    (output.status.success(), text)
}

#[test]
fn inspect_names_the_family_and_types_and_every_problem() {
    let dir = tempfile::tempdir().unwrap();
    let supported = dir.path().join("tiny.gguf");
    tributary_trainer::tiny::write_gguf(&supported, 1).unwrap();
    let (ok, text) = inspect(&supported);
    assert!(ok, "{text}");
    assert!(
        text.contains("architecture llama: everything in this file is supported"),
        "{text}"
    );
    assert!(text.contains("decoder: "), "{text}");
    assert!(
        text.contains("\"F32\": "),
        "the tensor types are listed: {text}"
    );

    // The same tensors under an architecture this decoder lacks, one of them in a GGML type
    // this reader cannot dequantize (IQ2_XXS, id 16), and no tokenizer it can build.
    let file = Gguf::open(&supported).unwrap();
    let mut writer = GgufWriter::new();
    for (key, value) in &file.metadata {
        let value = match key.as_str() {
            "general.architecture" => Value::String("gemma2".into()),
            "tokenizer.ggml.model" => Value::String("rwkv".into()),
            _ => value.clone(),
        };
        writer.metadata(key, value);
    }
    let patched = "blk.0.attn_q.weight";
    for tensor in &file.tensors {
        let values = file.dequantize(&tensor.name).unwrap();
        writer.tensor_f32(&tensor.name, tensor.dims.clone(), &values);
    }
    let mut bytes = writer.to_bytes();
    // A tensor's header entry: name, dimension count (u32), dimensions (u64 each), type (u32).
    let dims = file.tensor(patched).unwrap().dims.len();
    let at = bytes
        .windows(patched.len())
        .position(|window| window == patched.as_bytes())
        .unwrap()
        + patched.len()
        + 4
        + 8 * dims;
    assert_eq!(bytes[at..at + 4], 0u32.to_le_bytes(), "F32's type id");
    bytes[at..at + 4].copy_from_slice(&16u32.to_le_bytes());
    let unsupported = dir.path().join("other.gguf");
    std::fs::write(&unsupported, bytes).unwrap();
    let (ok, text) = inspect(&unsupported);
    assert!(!ok, "{text}");
    for named in [
        "architecture gemma2: not supported here",
        "type 16 (unsupported)",
        "1 tensors of GGML type 16, which this reader cannot dequantize (first: blk.0.attn_q.weight)",
        "\"gemma2\" is not supported",
        "tokenizer model \"rwkv\"",
        "3 problems stop this file from training",
    ] {
        assert!(text.contains(named), "{named:?} missing from:\n{text}");
    }
}
