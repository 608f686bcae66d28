//! Chat templates rendered by the trainer (minijinja) against transformers' own renderer
//! (Jinja2): `scripts/chat_template_fixtures.py` recorded SmolLM2-135M-Instruct's template and
//! three in the shapes of Llama 3, Mistral and Qwen on conversations with system turns, padding,
//! empty replies, non-ASCII text and a role order one template refuses.

use serde::Deserialize;
use tributary_trainer::chat::{ChatTemplate, Message};

#[derive(Deserialize)]
struct Template {
    source: String,
    bos: String,
    eos: String,
}

#[derive(Deserialize)]
struct Case {
    template: String,
    conversation: usize,
    add_generation_prompt: bool,
    text: Option<String>,
    error: Option<String>,
}

#[derive(Deserialize)]
struct Fixture {
    templates: std::collections::BTreeMap<String, Template>,
    conversations: Vec<Vec<Message>>,
    cases: Vec<Case>,
}

#[test]
fn renderings_equal_transformers_character_for_character() {
    let fixture: Fixture =
        serde_json::from_str(include_str!("fixtures/chat_templates.json")).unwrap();
    let mut refused = 0;
    for case in &fixture.cases {
        let spec = &fixture.templates[&case.template];
        let template = ChatTemplate::new(&spec.source, &spec.bos, &spec.eos).unwrap();
        let messages = &fixture.conversations[case.conversation];
        let got = template.render(messages, case.add_generation_prompt);
        let label = format!(
            "{} on conversation {} (generation prompt {})",
            case.template, case.conversation, case.add_generation_prompt
        );
        match (&case.text, &case.error) {
            (Some(want), None) => assert_eq!(&got.unwrap(), want, "{label}"),
            (None, Some(want)) => {
                refused += 1;
                let error = got.unwrap_err().to_string();
                assert!(error.contains(want.as_str()), "{label}: {error} vs {want}");
            }
            _ => panic!("{label}: the fixture holds neither text nor error"),
        }
    }
    assert!(
        refused > 0,
        "the fixture exercises a template's own refusal"
    );
    assert!(fixture.cases.len() >= 32);
}

#[test]
fn smollm2_template_segments_rebuild_the_rendering() {
    let fixture: Fixture =
        serde_json::from_str(include_str!("fixtures/chat_templates.json")).unwrap();
    let spec = &fixture.templates["smollm2"];
    let template = ChatTemplate::new(&spec.source, &spec.bos, &spec.eos).unwrap();
    for messages in &fixture.conversations {
        let segments = template.segments(messages).unwrap();
        let joined: String = segments.iter().map(|s| s.text.as_str()).collect();
        assert_eq!(joined, template.render(messages, false).unwrap());
        let replies = messages.iter().filter(|m| m.role == "assistant").count();
        let trained = segments.iter().filter(|s| s.trained).count();
        assert_eq!(trained, replies, "{segments:?}");
    }
}

#[test]
fn a_hugging_face_folder_brings_its_template_and_special_tokens_from_tokenizer_config() {
    use std::path::Path;
    use tributary_trainer::tokenizer::TextTokenizer;

    let fixture: Fixture =
        serde_json::from_str(include_str!("fixtures/chat_templates.json")).unwrap();
    let tokenizers = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tokenizers");
    let folder = |tokenizer: &str, config: serde_json::Value| {
        let dir = tempfile::tempdir().unwrap();
        std::fs::copy(
            tokenizers.join(tokenizer),
            dir.path().join("tokenizer.json"),
        )
        .unwrap();
        std::fs::write(dir.path().join("tokenizer_config.json"), config.to_string()).unwrap();
        dir
    };
    // Every case of `name`, rendered through the folder's tokenizer, as transformers rendered it.
    let renders_as_transformers = |tokenizer: &TextTokenizer, name: &str| {
        let template = tokenizer.chat_template().unwrap();
        let mut cases = 0;
        for case in fixture.cases.iter().filter(|case| case.template == name) {
            let messages = &fixture.conversations[case.conversation];
            let got = template
                .render(messages, case.add_generation_prompt)
                .unwrap();
            assert_eq!(Some(got), case.text.clone(), "{name}");
            cases += 1;
        }
        assert!(cases >= 4, "{name}");
    };

    // Qwen2's shape: the template as a string, no BOS token at all.
    let qwen = folder(
        "qwen2.tokenizer.json",
        serde_json::json!({
            "bos_token": null,
            "eos_token": "<|im_end|>",
            "chat_template": fixture.templates["chatml_tools"].source,
        }),
    );
    let tokenizer = TextTokenizer::from_folder(qwen.path()).unwrap();
    assert_eq!(
        tokenizer.bos, None,
        "named null, even though <|im_start|> exists"
    );
    assert_eq!(
        tokenizer.eos.and_then(|id| tokenizer.token(id)).as_deref(),
        Some("<|im_end|>")
    );
    renders_as_transformers(&tokenizer, "chatml_tools");

    // Llama 3's shape: named templates (the `default` one is taken), BOS as an added-token
    // object that the template prints.
    let llama = folder(
        "llama-bpe.tokenizer.json",
        serde_json::json!({
            "bos_token": {"content": "<|begin_of_text|>", "lstrip": false, "special": true},
            "eos_token": "<|end_of_text|>",
            "chat_template": [
                {"name": "tool_use", "template": "{{ raise_exception('not the default') }}"},
                {"name": "default", "template": fixture.templates["headers"].source},
            ],
        }),
    );
    let tokenizer = TextTokenizer::from_folder(llama.path()).unwrap();
    renders_as_transformers(&tokenizer, "headers");
    // `chat_template.jinja`, which newer transformers writes, comes first.
    std::fs::write(
        llama.path().join("chat_template.jinja"),
        &fixture.templates["smollm2"].source,
    )
    .unwrap();
    let tokenizer = TextTokenizer::from_folder(llama.path()).unwrap();
    assert_eq!(
        tokenizer.chat_template.as_deref(),
        Some(fixture.templates["smollm2"].source.as_str())
    );

    // Older folders name their special tokens in special_tokens_map.json only.
    let mapped = folder(
        "qwen2.tokenizer.json",
        serde_json::json!({"chat_template": fixture.templates["chatml_tools"].source}),
    );
    std::fs::write(
        mapped.path().join("special_tokens_map.json"),
        serde_json::json!({"eos_token": {"content": "<|im_end|>"}, "bos_token": null}).to_string(),
    )
    .unwrap();
    let tokenizer = TextTokenizer::from_folder(mapped.path()).unwrap();
    assert_eq!(tokenizer.bos, None);
    assert_eq!(
        tokenizer.eos.and_then(|id| tokenizer.token(id)).as_deref(),
        Some("<|im_end|>")
    );

    // A special token the vocabulary lacks is an error naming it, not a silent guess.
    let wrong = folder(
        "llama-bpe.tokenizer.json",
        serde_json::json!({"eos_token": "<|eot_id|>"}),
    );
    let error = TextTokenizer::from_folder(wrong.path())
        .unwrap_err()
        .to_string();
    assert!(error.contains("eos_token \"<|eot_id|>\""), "{error}");
}
