//! A `metrics` recorder for tests: every metric as (name, sorted labels) -> value.

use std::collections::HashMap;
use std::sync::Arc;

use metrics::{Counter, CounterFn, Gauge, GaugeFn, Histogram, HistogramFn, Key, KeyName, Metadata, Recorder};
use parking_lot::Mutex;

/// Every metric as (name, sorted labels) -> value; histograms keep their samples.
#[derive(Default)]
pub struct Captured {
    pub values: Mutex<HashMap<String, f64>>,
    samples: Mutex<HashMap<String, Vec<f64>>>,
    pub described: Mutex<Vec<String>>,
}

fn id(key: &Key) -> String {
    let mut labels: Vec<String> = key.labels().map(|l| format!("{}={}", l.key(), l.value())).collect();
    labels.sort();
    if labels.is_empty() {
        return key.name().to_string();
    }
    format!("{}{{{}}}", key.name(), labels.join(","))
}

struct Cell(String, Arc<Captured>);

impl CounterFn for Cell {
    fn increment(&self, value: u64) {
        *self.1.values.lock().entry(self.0.clone()).or_default() += value as f64;
    }
    fn absolute(&self, value: u64) {
        self.1.values.lock().insert(self.0.clone(), value as f64);
    }
}

impl GaugeFn for Cell {
    fn increment(&self, value: f64) {
        *self.1.values.lock().entry(self.0.clone()).or_default() += value;
    }
    fn decrement(&self, value: f64) {
        *self.1.values.lock().entry(self.0.clone()).or_default() -= value;
    }
    fn set(&self, value: f64) {
        self.1.values.lock().insert(self.0.clone(), value);
    }
}

impl HistogramFn for Cell {
    fn record(&self, value: f64) {
        self.1.samples.lock().entry(self.0.clone()).or_default().push(value);
    }
}

pub struct TestRecorder(pub Arc<Captured>);

impl Recorder for TestRecorder {
    fn describe_counter(&self, key: KeyName, _: Option<metrics::Unit>, _: metrics::SharedString) {
        self.0.described.lock().push(key.as_str().to_string());
    }
    fn describe_gauge(&self, key: KeyName, _: Option<metrics::Unit>, _: metrics::SharedString) {
        self.0.described.lock().push(key.as_str().to_string());
    }
    fn describe_histogram(&self, key: KeyName, _: Option<metrics::Unit>, _: metrics::SharedString) {
        self.0.described.lock().push(key.as_str().to_string());
    }
    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
        Counter::from_arc(Arc::new(Cell(id(key), self.0.clone())))
    }
    fn register_gauge(&self, key: &Key, _: &Metadata<'_>) -> Gauge {
        Gauge::from_arc(Arc::new(Cell(id(key), self.0.clone())))
    }
    fn register_histogram(&self, key: &Key, _: &Metadata<'_>) -> Histogram {
        Histogram::from_arc(Arc::new(Cell(id(key), self.0.clone())))
    }
}

impl Captured {
    pub fn get(&self, name: &str) -> Option<f64> {
        self.values.lock().get(name).copied()
    }
    #[allow(dead_code)]
    pub fn samples(&self, name: &str) -> usize {
        self.samples.lock().get(name).map_or(0, Vec::len)
    }
}
