//! Instruction data: chat conversations rendered with the model's own chat template (Jinja, as
//! in GGUF `tokenizer.chat_template` or `tokenizer_config.json`), cut into the parts that carry
//! loss (the assistant's replies) and the parts that do not (everything else).
//!
//! Templates run in minijinja set up as transformers sets up Jinja for them: blocks trimmed and
//! left-stripped, loop controls, Python string methods, `raise_exception`, and a `tojson` that
//! writes what Python's `json.dumps` writes. No `strftime_now`: templates that would print
//! today's date fall back to their fixed default, so a rendering never depends on the day.
//!
//! Which text belongs to whom is found by rendering growing prefixes of the conversation: the
//! text a message adds to the rendering of the ones before it is that message's. An assistant
//! reply starts after the generation prompt (`add_generation_prompt`), which stays with the
//! prompt; its end-of-turn marker belongs to the reply, so the model learns to stop. A template
//! whose renderings are not prefixes of each other is refused rather than guessed at.

use minijinja::value::{Kwargs, Value};
use minijinja::{Environment, Error as JinjaError, ErrorKind};
use serde::{Deserialize, Serialize};

/// One turn of a conversation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    /// `system`, `user` or `assistant`.
    pub role: String,
    /// What was said.
    pub content: String,
}

/// A piece of rendered text and whether it is trained on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Segment {
    /// Rendered text.
    pub text: String,
    /// `true` for an assistant reply.
    pub trained: bool,
}

/// A template that cannot be compiled or rendered.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ChatError {
    /// The Jinja source or its rendering failed.
    #[error("chat template: {0}")]
    Template(String),
    /// Renderings of growing conversations are not prefixes of each other.
    #[error(
        "chat template: rendering message {index} changes the text of the messages before it, \
         so the assistant's tokens cannot be told apart"
    )]
    NotIncremental {
        /// 0-based message index.
        index: usize,
    },
}

fn template_error(error: JinjaError) -> ChatError {
    // minijinja's alternate form carries the failing line.
    ChatError::Template(format!("{error:#}"))
}

const TEMPLATE: &str = "chat";

/// A compiled chat template with the special tokens it may print.
pub struct ChatTemplate {
    env: Environment<'static>,
    bos: String,
    eos: String,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .finish_non_exhaustive()
    }
}

impl ChatTemplate {
    /// Compiles `source`; `bos` and `eos` are what `{{ bos_token }}` and `{{ eos_token }}` print.
    pub fn new(source: &str, bos: &str, eos: &str) -> Result<Self, ChatError> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |message: String| -> Result<Value, JinjaError> {
                Err(JinjaError::new(ErrorKind::InvalidOperation, message))
            },
        );
        env.add_filter("tojson", python_json);
        env.add_template_owned(TEMPLATE, source.to_owned())
            .map_err(template_error)?;
        Ok(Self {
            env,
            bos: bos.to_owned(),
            eos: eos.to_owned(),
        })
    }

    /// The text of `messages`, followed by the prompt that opens the assistant's next turn when
    /// `add_generation_prompt` is set.
    pub fn render(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
    ) -> Result<String, ChatError> {
        let template = self.env.get_template(TEMPLATE).map_err(template_error)?;
        template
            .render(minijinja::context! {
                messages => messages,
                add_generation_prompt => add_generation_prompt,
                bos_token => &self.bos,
                eos_token => &self.eos,
            })
            .map_err(template_error)
    }

    /// The rendered conversation in pieces, each marked trained (an assistant reply) or not.
    /// Joined, the pieces are exactly [`ChatTemplate::render`] of the whole conversation.
    pub fn segments(&self, messages: &[Message]) -> Result<Vec<Segment>, ChatError> {
        let mut segments = Vec::new();
        let mut done = String::new();
        let mut take = |text: String, trained: bool, index: usize| {
            let Some(added) = text.strip_prefix(done.as_str()) else {
                return Err(ChatError::NotIncremental { index });
            };
            if !added.is_empty() {
                segments.push(Segment {
                    text: added.to_owned(),
                    trained,
                });
            }
            done = text;
            Ok(())
        };
        for (index, message) in messages.iter().enumerate() {
            let assistant = message.role == "assistant";
            if assistant {
                take(self.render(&messages[..index], true)?, false, index)?;
            }
            take(self.render(&messages[..=index], false)?, assistant, index)?;
        }
        Ok(segments)
    }
}

/// `tojson` as transformers defines it for chat templates: Python's `json.dumps` with
/// `ensure_ascii=False` (", " and ": " between items, keys in their order; `indent` for pretty
/// output).
fn python_json(value: Value, kwargs: Kwargs) -> Result<Value, JinjaError> {
    let indent: Option<usize> = kwargs.get("indent")?;
    kwargs.assert_all_used()?;
    let mut out = String::new();
    write_python_json(&value, indent, 0, &mut out)?;
    Ok(Value::from_safe_string(out))
}

fn write_python_json(
    value: &Value,
    indent: Option<usize>,
    depth: usize,
    out: &mut String,
) -> Result<(), JinjaError> {
    use minijinja::value::ValueKind;
    let newline = |out: &mut String, depth: usize| {
        if let Some(width) = indent {
            out.push('\n');
            out.extend(std::iter::repeat_n(' ', width * depth));
        }
    };
    let comma = if indent.is_some() { "," } else { ", " };
    match value.kind() {
        ValueKind::Undefined | ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if value.is_true() { "true" } else { "false" }),
        ValueKind::String => {
            out.push_str(&serde_json::Value::from(value.as_str().unwrap_or_default()).to_string())
        }
        ValueKind::Number => match i64::try_from(value.clone()) {
            Ok(int) if !value.to_string().contains('.') => out.push_str(&int.to_string()),
            _ => {
                let float = f64::try_from(value.clone())?;
                if float.is_finite() && float.fract() == 0.0 && float.abs() < 1e16 {
                    out.push_str(&format!("{float:.1}"));
                } else {
                    out.push_str(&float.to_string());
                }
            }
        },
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<Value> = value.try_iter()?.collect();
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(comma);
                }
                newline(out, depth + 1);
                write_python_json(item, indent, depth + 1, out)?;
            }
            if !items.is_empty() {
                newline(out, depth);
            }
            out.push(']');
        }
        ValueKind::Map => {
            let keys: Vec<Value> = value.try_iter()?.collect();
            out.push('{');
            for (i, key) in keys.iter().enumerate() {
                if i > 0 {
                    out.push_str(comma);
                }
                newline(out, depth + 1);
                out.push_str(&serde_json::Value::from(key.to_string()).to_string());
                out.push_str(": ");
                write_python_json(&value.get_item(key)?, indent, depth + 1, out)?;
            }
            if !keys.is_empty() {
                newline(out, depth);
            }
            out.push('}');
        }
        _ => {
            return Err(JinjaError::new(
                ErrorKind::BadSerialization,
                format!("tojson cannot write a {}", value.kind()),
            ))
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// ChatML, as SmolLM2 and Qwen write it.
    const CHATML: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are helpful.<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    /// Llama 3's shape: a BOS token, header tokens, `trim` and a loop.
    const LLAMA3: &str = "{{- bos_token }}\n{%- for message in messages %}\n    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}\n{%- endfor %}\n{%- if add_generation_prompt %}\n    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}\n{%- endif %}\n";

    fn chat(turns: &[(&str, &str)]) -> Vec<Message> {
        turns
            .iter()
            .map(|(role, content)| Message {
                role: (*role).into(),
                content: (*content).into(),
            })
            .collect()
    }

    #[test]
    fn chatml_segments_train_only_the_replies_and_their_end_of_turn() {
        let template = ChatTemplate::new(CHATML, "", "<|im_end|>").unwrap();
        let messages = chat(&[
            ("user", "Hi"),
            ("assistant", "Hello!"),
            ("user", "Bye"),
            ("assistant", "Farewell."),
        ]);
        let segments = template.segments(&messages).unwrap();
        let joined: String = segments.iter().map(|s| s.text.as_str()).collect();
        assert_eq!(joined, template.render(&messages, false).unwrap());
        let trained: Vec<&str> = segments
            .iter()
            .filter(|s| s.trained)
            .map(|s| s.text.as_str())
            .collect();
        assert_eq!(trained, ["Hello!<|im_end|>\n", "Farewell.<|im_end|>\n"]);
        assert!(segments[0]
            .text
            .starts_with("<|im_start|>system\nYou are helpful."));
        assert!(!segments[0].trained);
        // The generation prompt stays with the prompt.
        assert!(
            segments[1].text.ends_with("<|im_start|>assistant\n"),
            "{segments:?}"
        );
    }

    #[test]
    fn llama3_shape_renders_bos_and_trims() {
        let template = ChatTemplate::new(LLAMA3, "<|begin_of_text|>", "<|eot_id|>").unwrap();
        let messages = chat(&[("user", "  What is 2+2? "), ("assistant", "4")]);
        let text = template.render(&messages, false).unwrap();
        assert_eq!(
            text,
            "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nWhat is 2+2?<|eot_id|>\
             <|start_header_id|>assistant<|end_header_id|>\n\n4<|eot_id|>"
        );
        let segments = template.segments(&messages).unwrap();
        assert_eq!(segments.last().unwrap().text, "4<|eot_id|>");
        assert!(segments.last().unwrap().trained);
    }

    #[test]
    fn python_methods_raise_exception_and_tojson_work_as_in_transformers() {
        let source = "{% if messages[0].role != 'user' %}{{ raise_exception('first must be user') }}{% endif %}{{ messages[0].content.strip().upper() }} {{ {'a': [1, 'é']} | tojson }}";
        let template = ChatTemplate::new(source, "", "").unwrap();
        let text = template.render(&chat(&[("user", " hi ")]), false).unwrap();
        assert_eq!(text, "HI {\"a\": [1, \"é\"]}");
        let error = template
            .render(&chat(&[("system", "x")]), false)
            .unwrap_err()
            .to_string();
        assert!(error.contains("first must be user"), "{error}");
        assert!(ChatTemplate::new("{% for %}", "", "").is_err());
    }

    #[test]
    fn a_template_that_rewrites_earlier_turns_is_refused() {
        // Prints only the last message: each rendering replaces the one before.
        let template = ChatTemplate::new("{{ messages[-1].content }}", "", "").unwrap();
        let error = template
            .segments(&chat(&[("user", "a"), ("assistant", "b")]))
            .unwrap_err();
        assert!(matches!(error, ChatError::NotIncremental { .. }), "{error}");
    }
}
