//! hyperjob's own log lines on stderr (the job log for prepare and run): text, or with
//! `HYPERJOB_LOG_FORMAT=json` one JSON object per line (`level`, `message` and the event's
//! other fields). `HYPERJOB_LOG` sets the filter (default `warn`). Log lines never carry a
//! secret: nothing logs a script, a job variable or a private key.

use std::io::Write;

use tracing::field::{Field, Visit};
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::Layer;

/// Where log lines go: stderr, or for the job's relay (whose stderr is nowhere) the job log of
/// the stage it serves at the moment.
type Sink = fn() -> Box<dyn Write>;

pub fn init(relay: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("HYPERJOB_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let sink: Sink = if relay {
        || Box::new(hyperjob_core::relay::log_writer())
    } else {
        || Box::new(std::io::stderr())
    };
    if hyperjob_core::exit::json_logs() {
        tracing_subscriber::registry()
            .with(filter)
            .with(JsonLines(sink))
            .init();
    } else {
        tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(sink)
            .with_target(false)
            .without_time()
            .init();
    }
}

/// Writes every event as one JSON object, in one write.
struct JsonLines(Sink);

impl<S: tracing::Subscriber> Layer<S> for JsonLines {
    fn on_event(&self, event: &tracing::Event<'_>, _ctx: Context<'_, S>) {
        let mut fields = Fields(serde_json::Map::new());
        event.record(&mut fields);
        let mut object = serde_json::Map::new();
        object.insert(
            "level".into(),
            event.metadata().level().as_str().to_string().into(),
        );
        object.extend(fields.0);
        let line = format!("{}\n", serde_json::Value::Object(object));
        let mut sink = (self.0)();
        let _ = sink.write_all(line.as_bytes());
        let _ = sink.flush();
    }
}

struct Fields(serde_json::Map<String, serde_json::Value>);

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().into(), value.into());
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.0.insert(field.name().into(), value.into());
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.0.insert(field.name().into(), value.into());
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.0.insert(field.name().into(), value.into());
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0
            .insert(field.name().into(), format!("{value:?}").into());
    }
}
