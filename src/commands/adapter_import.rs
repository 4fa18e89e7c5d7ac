//! `sac adapter import`: the reference implementation's adapter.pt to an
//! adapter directory.

use crate::cli::AdapterImportArgs;
use sac::adapter::{ImportSettings, SacAdapter};
use sac::runtime::LoadedModel;

pub fn run(args: &AdapterImportArgs) -> anyhow::Result<()> {
    let model = LoadedModel::load(&args.model.spec())?;
    let settings = ImportSettings {
        chunk_size: args.chunk_size as usize,
        ratio: args.ratio.map(|r| r as usize),
        lora_scale: args.lora_scale,
        base_model: model.files.id.clone(),
        base_model_fingerprint: Some(model.fingerprint.model.clone()),
    };
    let adapter = SacAdapter::import_reference_pt(&args.pt, settings, &model.config)?;
    adapter.save(&args.output)?;
    let c = &adapter.config;
    eprintln!(
        "sac: wrote adapter {}: ratio {}, chunk {}, {} role embeddings, LoRA rank {} on {}",
        args.output.display(),
        c.ratio,
        c.chunk_size,
        c.mem_size,
        c.lora_rank,
        c.lora_targets.join(", ")
    );
    Ok(())
}
