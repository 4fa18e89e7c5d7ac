//! `sac train`: flags to settings, the model loaded, the trainer run under a
//! progress bar.

use std::io::IsTerminal;

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};

use crate::cli::TrainArgs;
use sac::device::Workload;
use sac::runtime::{LoadedModel, ModelSpec};
use sac::train::{Event, Stage, Trainer};

pub fn run(args: &TrainArgs) -> anyhow::Result<()> {
    let settings = args.settings().map_err(anyhow::Error::msg)?;
    // A missing data file fails before the model loads.
    for path in std::iter::once(&settings.data).chain(&settings.eval) {
        std::fs::File::open(path).with_context(|| format!("cannot read {}", path.display()))?;
    }
    sac::atomic::remove_temp_files_on_signal()?;
    let out = settings.out.clone();
    let skip_rule = match settings.stage {
        Stage::Autoencode => format!(
            "of more than {} tokens (--max-context)",
            settings.window.max_context
        ),
        _ => format!(
            "of at most {} tokens (--min-context)",
            settings.window.min_context
        ),
    };
    let spec = ModelSpec {
        workload: Workload::Training,
        ..args.model.spec()
    };
    let model = LoadedModel::load(&spec)?;
    let mut trainer = Trainer::new(&model, settings)?;
    if trainer.skipped() > 0 && !args.quiet {
        eprintln!("sac: skipped {} texts {skip_rule}", trainer.skipped());
    }
    let plan = trainer.plan();
    let bar = progress_bar(plan.stop as u64, trainer.step() as u64, args.quiet);
    let mut last_loss = None;
    trainer.run(|event| match event {
        Event::Step(report) => {
            last_loss = Some(report.loss);
            bar.set_position(report.step as u64);
            bar.set_message(format!(
                "loss {:.4}, {:.0} tokens/s",
                report.loss, report.tokens_per_s
            ));
        }
        Event::Saved(_) => {}
        Event::Eval(step, scores) => bar.println(format!(
            "step {step}: EM {:.1}, F1 {:.1} on {} questions",
            100.0 * scores.em,
            100.0 * scores.f1,
            scores.examples
        )),
    })?;
    bar.finish_and_clear();
    if !args.quiet {
        eprintln!(
            "sac: wrote adapter {} at step {} of {}{}",
            out.display(),
            trainer.step(),
            plan.total_steps,
            last_loss.map_or(String::new(), |l| format!(", last loss {l:.4}"))
        );
    }
    Ok(())
}

fn progress_bar(steps: u64, done: u64, quiet: bool) -> ProgressBar {
    if quiet || !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(steps).with_position(done);
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} training [{bar:30}] {pos}/{len} steps, {msg}, {eta} left",
        )
        .expect("static progress template")
        .progress_chars("=> "),
    );
    bar.set_message("first step");
    bar
}
