//! The worker specs and output schemas built into the binary: the files of `workers/` and
//! `schemas/workers/` as this version ships them. They are used when the default directories
//! are absent (the binary run from anywhere but the repository or the image), so that `run`
//! and `demo` work out of the box; directories that exist always win, and one named
//! explicitly must exist. A test keeps this list equal to the files.

/// (path as in the repository, text) of every shipped worker spec.
pub(super) const SPECS: &[(&str, &str)] = &[
    (
        "workers/language.toml",
        include_str!("../../workers/language.toml"),
    ),
    (
        "workers/reply_draft.toml",
        include_str!("../../workers/reply_draft.toml"),
    ),
    (
        "workers/sentiment.toml",
        include_str!("../../workers/sentiment.toml"),
    ),
    (
        "workers/summarize.toml",
        include_str!("../../workers/summarize.toml"),
    ),
    (
        "workers/triage.toml",
        include_str!("../../workers/triage.toml"),
    ),
];

/// (path relative to `schemas/`, as specs name it, text) of every shipped output schema.
pub(super) const SCHEMAS: &[(&str, &str)] = &[
    (
        "workers/language.output.schema.json",
        include_str!("../../schemas/workers/language.output.schema.json"),
    ),
    (
        "workers/reply_draft.output.schema.json",
        include_str!("../../schemas/workers/reply_draft.output.schema.json"),
    ),
    (
        "workers/sentiment.output.schema.json",
        include_str!("../../schemas/workers/sentiment.output.schema.json"),
    ),
    (
        "workers/summarize.output.schema.json",
        include_str!("../../schemas/workers/summarize.output.schema.json"),
    ),
    (
        "workers/triage.output.schema.json",
        include_str!("../../schemas/workers/triage.output.schema.json"),
    ),
];

/// The built-in schema a spec names, if there is one.
pub(super) fn schema(path: &std::path::Path) -> Option<&'static str> {
    SCHEMAS
        .iter()
        .find(|(name, _)| std::path::Path::new(name) == path)
        .map(|(_, text)| *text)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every file of `dir` with `extension`, as (path relative to `base`, text), sorted.
    fn files(base: &str, dir: &str, extension: &str) -> Vec<(String, String)> {
        let mut found: Vec<(String, String)> = std::fs::read_dir(format!("{base}/{dir}"))
            .unwrap()
            .map(|entry| entry.unwrap().path())
            .filter(|path| path.to_string_lossy().ends_with(extension))
            .map(|path| {
                let name = format!("{dir}/{}", path.file_name().unwrap().to_string_lossy());
                (name, std::fs::read_to_string(&path).unwrap())
            })
            .collect();
        found.sort();
        found
    }

    fn owned(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter()
            .map(|(name, text)| (name.to_string(), text.to_string()))
            .collect()
    }

    /// A worker added to `workers/` (or a schema to `schemas/workers/`) must be added here
    /// too, or the binary run elsewhere would lack it.
    #[test]
    fn the_built_in_set_is_the_repository_s_files() {
        assert_eq!(owned(SPECS), files(".", "workers", ".toml"));
        assert_eq!(owned(SCHEMAS), files("schemas", "workers", ".schema.json"));
    }
}
