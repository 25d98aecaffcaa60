//! What a tenant that does not store prompts or command text keeps of an event: the same
//! drops whether the event is held as JSON or typed.

use serde_json::{Map, Value};
use shared::events::{MetricSample, Payload};

use super::envelope::{Data, Stamped};

type Object = Map<String, Value>;

/// The sample Claude Code's `user_prompt` log records become.
pub const USER_PROMPT: &str = "claude_code.user_prompt";

/// Claude Code's `user_prompt` event without the prompt's text (its length stays), for
/// tenants that do not store prompts.
pub fn drop_prompt_text(event: &mut Value) {
    // Looked up by key, not by JSON pointer: this runs on every event of most requests.
    let Some(data) = event.get_mut("data").and_then(Value::as_object_mut) else {
        return;
    };
    if data.get("name").and_then(Value::as_str) != Some(USER_PROMPT) {
        return;
    }
    // A `prompt` beside the sample's fields is one the decoding would move into `extra`.
    data.remove("prompt");
    for place in ["extra", "labels"] {
        if let Some(m) = data.get_mut(place).and_then(Value::as_object_mut) {
            m.remove("prompt");
        }
    }
}

/// [`drop_prompt_text`] of a sample held typed.
pub fn drop_sample_prompt(sample: &mut MetricSample) {
    if sample.name == USER_PROMPT {
        sample.extra.remove("prompt");
        sample.labels.remove("prompt");
    }
}

/// Whether an attribute or field named `key` holds what a command or tool was run with
/// (Claude Code's `tool_parameters`, the hook's `command`, `args`, `*_input`, …), as opposed to
/// what was run (`command_name`, `tool_name`).
fn is_argument(key: &str) -> bool {
    const NAMES: [&str; 11] = [
        "command",
        "full_command",
        "bash_command",
        "command_line",
        "cmd",
        "tool_parameters",
        "tool_input",
        "parameters",
        "arguments",
        "args",
        "input",
    ];
    const SUFFIXES: [&str; 6] = [
        "_parameters",
        "_arguments",
        "_args",
        "_input",
        ".parameters",
        ".arguments",
    ];
    // Compared without allocating: this runs for every key of every event a tenant sends.
    let ends_with = |suffix: &str| {
        key.len() >= suffix.len()
            && key.as_bytes()[key.len() - suffix.len()..].eq_ignore_ascii_case(suffix.as_bytes())
    };
    NAMES.iter().any(|n| key.eq_ignore_ascii_case(n)) || SUFFIXES.iter().any(|s| ends_with(s))
}

/// An event without the arguments of the commands it describes — `command.executed`'s
/// `args`, and any argument-like key (see [`is_argument`]), at any depth, in a
/// `tool.executed`'s `details`, an event's `extra`, `context` or `metadata`, or a sample's
/// labels — for tenants that do not store them; its typed payload changed as its JSON is.
/// Done after validation, so validation does not depend on the tenant's choice.
pub fn drop_stamped_command_text(env: &mut Stamped) {
    let Data::Typed(payload) = &mut env.data else {
        if let Data::Json(data) = &mut env.data {
            drop_json_command_text(data);
        }
        return;
    };
    // `extra`, and the event's other map that may hold arguments.
    let maps: [Option<&mut Object>; 2] = match payload {
        Payload::CommandExecuted(p) => {
            p.args = None;
            [Some(&mut p.extra), p.context.as_mut()]
        }
        Payload::AgentInteracted(p) => [Some(&mut p.extra), p.metadata.as_mut()],
        Payload::ToolExecuted(p) => [Some(&mut p.extra), p.details.as_mut()],
        Payload::SessionStarted(p) => [Some(&mut p.extra), p.context.as_mut()],
        Payload::SessionEnded(p) => [Some(&mut p.extra), p.context.as_mut()],
        Payload::MetricSample(p) => {
            p.labels.retain(|k, _| !is_argument(k));
            [Some(&mut p.extra), None]
        }
        Payload::SessionContext(p) => [Some(&mut p.extra), None],
        Payload::ProductivityRecorded(p) => [Some(&mut p.extra), None],
        Payload::PullRequestChanged(p) => [Some(&mut p.extra), None],
        Payload::BranchPushed(p) => [Some(&mut p.extra), None],
        Payload::Auth(_, p) => [Some(&mut p.extra), None],
    };
    for m in maps.into_iter().flatten() {
        drop_arguments(m);
    }
}

/// `m` without its argument-like keys, at any depth (`{"env": {"command_line": …}}`,
/// `{"steps": [{"command": …}]}`).
fn drop_arguments(m: &mut Object) {
    m.retain(|k, _| !is_argument(k));
    for v in m.values_mut() {
        drop_nested_arguments(v);
    }
}

fn drop_nested_arguments(v: &mut Value) {
    match v {
        Value::Object(m) => drop_arguments(m),
        Value::Array(items) => items.iter_mut().for_each(drop_nested_arguments),
        _ => {}
    }
}

fn drop_json_command_text(data: &mut Value) {
    let Some(data) = data.as_object_mut() else {
        return;
    };
    data.remove("args");
    for place in ["details", "extra", "context", "labels", "metadata"] {
        if let Some(Value::Object(m)) = data.get_mut(place) {
            drop_arguments(m);
        }
    }
    // As the payload writes it: no `extra` when nothing is left in it.
    if data
        .get("extra")
        .is_some_and(|e| e.as_object().is_some_and(Map::is_empty))
    {
        data.remove("extra");
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;
    use shared::events::{Actor, Envelope, EventType, Source};
    use shared::tenant::TenantId;

    use super::*;

    fn envelope(event_type: EventType, data: Value) -> Envelope {
        Envelope {
            id: uuid::Uuid::nil(),
            tenant_id: TenantId::new(),
            event_type,
            schema_version: 1,
            occurred_at: chrono::Utc::now(),
            received_at: chrono::Utc::now(),
            actor: Actor::default(),
            source: Source::Api,
            data,
        }
    }

    #[test]
    fn command_arguments_are_dropped_and_what_was_run_is_kept() {
        let mut tool = envelope(
            EventType::ToolExecuted,
            json!({"tool_name": "Bash", "details": {"tool_use_id": "t", "command": "cat ~/.ssh/id_rsa",
                   "tool_parameters": "{\"bash_command\":\"cat\"}", "tool_input": {"x": 1},
                   "decision_type": "accept"},
                   "extra": {"full_command": "rm -rf /", "mcp_input": "secret", "kept": 1}}),
        );
        drop_json_command_text(&mut tool.data);
        assert_eq!(
            tool.data,
            json!({"tool_name": "Bash", "details": {"tool_use_id": "t", "decision_type": "accept"},
                   "extra": {"kept": 1}})
        );
        let mut command = envelope(
            EventType::CommandExecuted,
            json!({"command_name": "deploy", "args": {"token": "s3cret"},
                   "context": {"cwd": "/repo", "command_line": "deploy --token s3cret"}}),
        );
        drop_json_command_text(&mut command.data);
        assert_eq!(
            command.data,
            json!({"command_name": "deploy", "context": {"cwd": "/repo"}})
        );
        let mut sample = envelope(
            EventType::MetricSample,
            json!({"name": "codex.exec", "labels": {"command": "ls -la", "command_name": "exec"}}),
        );
        drop_json_command_text(&mut sample.data);
        assert_eq!(sample.data["labels"], json!({"command_name": "exec"}));
        assert!(
            is_argument("Tool_Parameters") && is_argument("MCP_INPUT") && !is_argument("inputs")
        );
    }

    /// `data` of type `t` after the command-text drop, held as JSON and held typed.
    fn dropped_both_ways(t: EventType, data: Value) -> (Value, Value) {
        let mut json = envelope(t, data.clone()).map_data(Data::Json);
        let payload = Payload::decode(t, 1, data, "data").unwrap();
        let mut typed = envelope(t, Value::Null).map_data(|_| Data::Typed(payload));
        drop_stamped_command_text(&mut json);
        drop_stamped_command_text(&mut typed);
        (json.data.into_value(), typed.data.into_value())
    }

    #[test]
    fn nested_arguments_are_dropped_too() {
        let data = json!({"user_id": "u", "session_id": "s", "tool_name": "Bash", "duration_ms": 1,
            "success": true, "details": {"env": {"command_line": "deploy --token t", "cwd": "/r"}},
            "extra": {"steps": [{"command": "rm -rf /", "n": 1}, [{"tool_input": "x"}], "plain"]}});
        let expected = json!({"user_id": "u", "session_id": "s", "tool_name": "Bash",
            "duration_ms": 1, "success": true, "details": {"env": {"cwd": "/r"}},
            "extra": {"steps": [{"n": 1}, [{}], "plain"]}});
        let (json, typed) = dropped_both_ways(EventType::ToolExecuted, data);
        assert_eq!(json, expected);
        assert_eq!(typed, expected);
    }

    #[test]
    fn a_prompt_is_dropped_wherever_it_is_sent() {
        let mut event = json!({"type": "metric.sample", "data": {"name": USER_PROMPT, "value": 1,
            "prompt": "top", "labels": {"prompt": "label", "prompt_length": "5"},
            "extra": {"prompt": "extra", "kept": 1}}});
        drop_prompt_text(&mut event);
        assert_eq!(
            event["data"],
            json!({"name": USER_PROMPT, "value": 1, "labels": {"prompt_length": "5"},
                   "extra": {"kept": 1}})
        );
    }

    /// Both forms of an event end as the payload writes it: an `extra` that held only
    /// arguments is not written at all, as the typed payload writes an empty one.
    #[test]
    fn an_emptied_extra_is_not_written() {
        let data = json!({"user_id": "u", "command_name": "c", "duration_ms": 1,
                          "status": "success", "extra": {"args": "-rf"}});
        let (json, typed) = dropped_both_ways(EventType::CommandExecuted, data);
        let expected =
            json!({"user_id": "u", "command_name": "c", "duration_ms": 1, "status": "success"});
        assert_eq!(json, expected);
        assert_eq!(typed, expected);
    }
}
