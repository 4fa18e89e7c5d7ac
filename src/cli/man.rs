//! The manual page, rendered from the flags.

use super::Cli;

/// The manual page `man/sac.1`: one page for the whole tool, the top-level
/// sections first, then a section per subcommand with its description,
/// synopsis and options as subsections.
pub fn man_page() -> std::io::Result<Vec<u8>> {
    use clap::CommandFactory;

    fn subcommands(cmd: &clap::Command, prefix: &str, out: &mut Vec<u8>) -> std::io::Result<()> {
        for sub in cmd.get_subcommands().filter(|s| s.get_name() != "help") {
            let name = format!("{prefix} {}", sub.get_name());
            let man = clap_mangen::Man::new(sub.clone().name(name.clone()));
            let mut part = Vec::new();
            man.render_description_section(&mut part)?;
            man.render_synopsis_section(&mut part)?;
            man.render_options_section(&mut part)?;
            out.extend_from_slice(format!(".SH \"{}\"\n", name.to_uppercase()).as_bytes());
            let part = String::from_utf8_lossy(&part).replace(".SH ", ".SS ");
            out.extend_from_slice(part.as_bytes());
            subcommands(sub, &name, out)?;
        }
        Ok(())
    }

    let cmd = Cli::command();
    let man = clap_mangen::Man::new(cmd.clone());
    let mut out = Vec::new();
    man.render_title(&mut out)?;
    man.render_name_section(&mut out)?;
    man.render_synopsis_section(&mut out)?;
    man.render_description_section(&mut out)?;
    man.render_options_section(&mut out)?;
    subcommands(&cmd, "sac", &mut out)?;
    man.render_version_section(&mut out)?;
    Ok(out)
}
