//! GGUF tokenizers against their reference libraries.
//!
//! `scripts/tokenizer_fixtures.py` rebuilds Llama 3's and Qwen2's byte-level BPE (with their
//! published pre-tokenizers) and a Llama 2-style SentencePiece BPE at a small scale, records the
//! reference libraries' token ids on every line of a committed multilingual text, and writes the
//! same tokenizers as GGUF metadata, as llama.cpp's converter stores them.

use std::path::{Path, PathBuf};

use tributary_trainer::gguf::Gguf;
use tributary_trainer::tokenizer::TextTokenizer;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tokenizers")
}

/// Every line of the text, then the whole text, as the script splits it.
fn cases() -> Vec<String> {
    let text = std::fs::read_to_string(fixtures().join("multilingual.txt")).unwrap();
    let mut cases: Vec<String> = text.split('\n').map(str::to_owned).collect();
    cases.push(text);
    cases
}

fn reference_ids(name: &str) -> Vec<Vec<u32>> {
    let text = std::fs::read_to_string(fixtures().join("reference.json")).unwrap();
    let all: serde_json::Value = serde_json::from_str(&text).unwrap();
    serde_json::from_value(all[name]["ids"].clone()).unwrap()
}

fn check(name: &str) -> TextTokenizer {
    let file = Gguf::open(&fixtures().join(format!("{name}.gguf"))).unwrap();
    let tokenizer = TextTokenizer::from_gguf(&file).unwrap();
    let want = reference_ids(name);
    let cases = cases();
    assert_eq!(want.len(), cases.len());
    for (case, want) in cases.iter().zip(&want) {
        let got = tokenizer.encode(case).unwrap();
        assert_eq!(&got, want, "{name}: {case:?}");
    }
    tokenizer
}

#[test]
fn llama_3_pre_tokenizer_gives_the_reference_ids() {
    let tokenizer = check("llama-bpe");
    // The reference's own tokenizer.json, read directly, agrees too.
    let json = TextTokenizer::from_file(&fixtures().join("llama-bpe.tokenizer.json")).unwrap();
    for case in cases() {
        assert_eq!(
            tokenizer.encode(&case).unwrap(),
            json.encode(&case).unwrap()
        );
        assert_eq!(
            tokenizer.decode(&tokenizer.encode(&case).unwrap()).unwrap(),
            case
        );
    }
    // Digits go in threes, unlike Qwen2's.
    let ids = tokenizer.encode("1234567").unwrap();
    let pieces: Vec<String> = ids
        .iter()
        .map(|id| tokenizer.decode(&[*id]).unwrap())
        .collect();
    assert!(pieces.iter().all(|piece| piece.len() <= 3), "{pieces:?}");
}

#[test]
fn qwen2_pre_tokenizer_and_nfc_give_the_reference_ids() {
    let tokenizer = check("qwen2");
    // NFC: a decomposed é tokenizes as the composed one.
    assert_eq!(
        tokenizer.encode("e\u{301}").unwrap(),
        tokenizer.encode("\u{e9}").unwrap()
    );
    for case in cases().iter().filter(|case| !case.contains('\u{301}')) {
        assert_eq!(
            &tokenizer.decode(&tokenizer.encode(case).unwrap()).unwrap(),
            case
        );
    }
}

#[test]
fn sentencepiece_bpe_gives_the_reference_ids_and_falls_back_to_bytes() {
    let tokenizer = check("llama-spm");
    for case in cases() {
        assert_eq!(
            tokenizer.decode(&tokenizer.encode(&case).unwrap()).unwrap(),
            case
        );
    }
    // Characters outside the vocabulary become their UTF-8 bytes (`<0x..>` pieces).
    let ids = tokenizer.encode("\u{1F9EA}").unwrap();
    assert_eq!(ids.len(), 1 + 4, "{ids:?}");
    assert_eq!(tokenizer.bos, Some(1));
    assert_eq!(tokenizer.eos, Some(2));
}

#[test]
fn an_unknown_pre_tokenizer_is_refused_by_name() {
    use tributary_trainer::gguf::{GgufWriter, Value};
    let file = Gguf::open(&fixtures().join("qwen2.gguf")).unwrap();
    let mut writer = GgufWriter::new();
    for (key, value) in &file.metadata {
        writer.metadata(key, value.clone());
    }
    writer.metadata("tokenizer.ggml.pre", Value::String("deepseek-coder".into()));
    let file = Gguf::parse(writer.to_bytes()).unwrap();
    let error = TextTokenizer::from_gguf(&file).unwrap_err().to_string();
    assert!(error.contains("\"deepseek-coder\""), "{error}");
}

#[test]
fn a_tokenizer_json_post_processor_truncation_and_padding_are_dropped() {
    // A GPT-2-style tokenizer.json often carries a ByteLevel post-processor that trims offsets,
    // and some keep truncation or padding: none may cut a document, pad it, or move the chat
    // mask's offsets.
    let mut json: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("llama-bpe.tokenizer.json")).unwrap(),
    )
    .unwrap();
    json["post_processor"] = serde_json::json!({
        "type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true
    });
    json["truncation"] = serde_json::json!({
        "direction": "Right", "max_length": 4, "strategy": "LongestFirst", "stride": 0
    });
    json["padding"] = serde_json::json!({
        "strategy": {"Fixed": 64}, "direction": "Right", "pad_to_multiple_of": null,
        "pad_id": 0, "pad_type_id": 0, "pad_token": "!"
    });
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tokenizer.json");
    std::fs::write(&path, json.to_string()).unwrap();
    let plain = TextTokenizer::from_file(&fixtures().join("llama-bpe.tokenizer.json")).unwrap();
    let configured = TextTokenizer::from_file(&path).unwrap();
    let text = "a   spaced   text\n\nwith more than four tokens";
    let ids = configured.encode(text).unwrap();
    assert_eq!(ids, plain.encode(text).unwrap());
    assert!(ids.len() > 4 && ids.len() < 64, "{ids:?}");
    let offsets = configured.encode_with_offsets(text).unwrap();
    assert!(
        offsets.iter().all(|(_, bytes)| !bytes.is_empty()),
        "{offsets:?}"
    );
    let covered: String = offsets
        .iter()
        .map(|(_, bytes)| &text[bytes.clone()])
        .collect();
    assert_eq!(covered, text, "the ranges tile the text");
}
