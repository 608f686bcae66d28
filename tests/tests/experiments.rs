//! Every experiment file in `experiments/` loads, and its LoRA shape fits the model it names.

use tributary_coordinator::settings::load_experiment_str;
use tributary_shared::config::AdapterSpec;

#[test]
fn every_experiment_file_loads() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../experiments");
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("toml") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        let config = load_experiment_str(&text, &name, Default::default(), &[])
            .unwrap_or_else(|error| panic!("{name}: {error:#}"));
        config.adapter.layout().unwrap();
        if config.model.name.starts_with("smollm2-135m") {
            // SmolLM2-135M: 30 layers, width 576, 3 KV heads of 64, MLP 1536.
            let AdapterSpec::Lora {
                layers,
                hidden_size,
                kv_size,
                intermediate_size,
                ..
            } = config.adapter
            else {
                panic!("{name}: a SmolLM2 experiment needs a LoRA adapter");
            };
            assert_eq!(
                (layers, hidden_size, kv_size, intermediate_size),
                (30, 576, 192, 1536),
                "{name}"
            );
        }
        seen += 1;
    }
    assert!(seen >= 4, "found {seen} experiment files");
}
