//! Prometheus metrics. (Skeleton: the operational helper fills in storage and rendering.)

use crate::engine::EngineStats;

#[derive(Debug, Default)]
pub struct Metrics {}

impl Metrics {
    pub fn record_request(&self, _route: &str, _status: u16) {}
    pub fn add_prompt_tokens(&self, _n: u64) {}
    pub fn add_generated_tokens(&self, _n: u64) {}
    /// Time to first token, seconds.
    pub fn observe_ttft(&self, _secs: f64) {}
    /// Inter-token latency, seconds.
    pub fn observe_itl(&self, _secs: f64) {}
    pub fn rejection(&self, _reason: &'static str) {}
    pub fn render(&self, _engine: Option<&EngineStats>) -> String {
        String::new()
    }
}
