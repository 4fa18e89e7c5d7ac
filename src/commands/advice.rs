//! The library's errors say what is wrong in its own terms; where a flag
//! changes the outcome, the command line says which.

use sac::Error;
use sac::compress::{SettingsError, settings};
use sac::from_sack::ContextError;
use sac::train::SetupError;

/// `err` with the first library error in its chain that a flag can fix
/// rewritten to name the flag; the context above it is kept.
pub fn advise(err: anyhow::Error) -> anyhow::Error {
    let mut parts = Vec::new();
    for cause in err.chain() {
        // A library error may hold another, boxed, as its cause.
        let error = cause
            .downcast_ref::<Error>()
            .or_else(|| cause.downcast_ref::<Box<Error>>().map(|boxed| &**boxed));
        if let Some(advice) = error.and_then(flag_advice) {
            parts.push(advice);
            return anyhow::anyhow!(parts.join(": "));
        }
        parts.push(cause.to_string());
    }
    err
}

fn flag_advice(error: &Error) -> Option<String> {
    Some(match error {
        Error::Settings(settings) => settings_advice(settings)?,
        Error::Setup(setup) => setup_advice(setup)?,
        Error::HubOptionsForLocalModel(model) => {
            format!("--revision and --gguf-file apply to Hub ids, and `{model}` is a local model")
        }
        Error::UnknownRatio { .. } => format!("{error}: pass --ratio"),
        Error::Diverged { norm } => {
            format!("the gradient norm is {norm}; the loss diverged (try a lower --lr)")
        }
        Error::NothingToPretrain { .. } => format!("{error} (--min-context)"),
        Error::Context(ContextError::NeedsAdapter { .. }) => {
            format!("{error}: pass --adapter DIR")
        }
        Error::Context(ContextError::AdapterNotNeeded { .. }) => {
            format!("{error}: leave out --adapter")
        }
        Error::NoCuda => {
            "this sac was built without CUDA; rebuild with `--features cuda` or use --device cpu"
                .into()
        }
        _ => return None,
    })
}

fn settings_advice(error: &SettingsError) -> Option<String> {
    Some(match error {
        SettingsError::NeedsAdapter(method) => format!(
            "the {method} compressor needs an adapter (--adapter DIR); without one, use \
             --compressor uniform"
        ),
        SettingsError::NoSinks(method) => {
            format!("--sinks applies to the training-free compressors, not to {method}")
        }
        SettingsError::NoHeadBudget(method) => {
            format!(
                "--head-budget applies to {}, not to {method}",
                settings::head_budget_methods()
            )
        }
        SettingsError::ReadsPastModel { .. } => format!("{error} (--chunk-size)"),
        _ => return None,
    })
}

fn setup_advice(error: &SetupError) -> Option<String> {
    Some(match error {
        SetupError::OutIsFile(out) => format!("--out {} is a file, not a directory", out.display()),
        SetupError::NothingToResume { dir, file } => {
            format!(
                "--resume: {} holds no {file} to continue from",
                dir.display()
            )
        }
        SetupError::RunExists(out) => format!(
            "{} already holds a training run or an adapter; pass --resume to continue it, \
             or choose another --out",
            out.display()
        ),
        SetupError::InitForAnotherModel(why) => {
            format!("adapter {why} (--init-any-model starts from it anyway)")
        }
        SetupError::DiffersFromInit {
            setting,
            ours,
            theirs,
        } => format!("--{setting} {ours} differs from the --init adapter's {theirs}"),
        SetupError::WindowTooLong {
            max_context,
            continuation,
            fit,
        } => format!("--max-context {max_context} with --continuation {continuation}: {fit}"),
        SetupError::TextTooLong { max_context, fit } => {
            format!("--max-context {max_context}, restated in full: {fit}")
        }
        SetupError::StageNotFor {
            method,
            stage,
            stages,
        } => format!(
            "--method {method} has no --stage {stage} (it trains {})",
            stages.join(", ")
        ),
        SetupError::TargetNotFor { method, target } => {
            format!("--lora-targets: --method {method} cannot adapt {target}")
        }
        SetupError::SettingNotFor { setting, method } => {
            format!("--{setting} applies to --method {method} only")
        }
        SetupError::NeedsInit { method, stage } => format!(
            "--method {method} --stage {stage} fine-tunes the decoder of a trained compressor: \
             pass --init with an adapter of its first stage (--stage autoencode)"
        ),
        SetupError::InitMethod { found, method } => {
            format!("the --init adapter is {found}'s, not --method {method}'s")
        }
        SetupError::ResumeDiffers { .. } | SetupError::NothingLeft { .. } => return None,
    })
}
