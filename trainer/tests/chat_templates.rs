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
