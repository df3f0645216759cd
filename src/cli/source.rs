//! A function's code as Dispatch's API takes it: the file or directory at a path, packed
//! into a gzipped tar and base64-encoded into the Function's `source` field. A single file
//! goes into the archive under its own name (`hello.py`), a directory's contents at the
//! archive's root (so that a handler `hello.handle` finds `hello.py` in both cases).

use std::io::Write;
use std::path::{Path, PathBuf};

use base64::Engine;
use flate2::Compression;
use flate2::write::GzEncoder;

/// The base64 of the tar.gz of `path`.
pub fn encode(path: &Path) -> std::io::Result<String> {
    Ok(base64::engine::general_purpose::STANDARD.encode(tar_gz(path)?))
}

/// The tar.gz of `path`: the file, or the directory's files and folders, in name order so
/// that the same tree always gives the same archive.
pub fn tar_gz(path: &Path) -> std::io::Result<Vec<u8>> {
    let meta = std::fs::metadata(path)?;
    let mut tar = tar::Builder::new(GzEncoder::new(Vec::new(), Compression::default()));
    tar.mode(tar::HeaderMode::Deterministic);
    if meta.is_dir() {
        for (full, relative) in walk(path)? {
            tar.append_path_with_name(&full, &relative)?;
        }
    } else {
        let name = path.file_name().ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("{} names no file", path.display()),
            )
        })?;
        tar.append_path_with_name(path, name)?;
    }
    let mut gz = tar.into_inner()?;
    gz.flush()?;
    gz.finish()
}

/// Every entry under `root` (folders before what they hold), with its path relative to
/// `root`.
fn walk(root: &Path) -> std::io::Result<Vec<(PathBuf, PathBuf)>> {
    let mut found = Vec::new();
    let mut pending = vec![PathBuf::new()];
    while let Some(relative) = pending.pop() {
        let mut entries: Vec<_> =
            std::fs::read_dir(root.join(&relative))?.collect::<Result<_, _>>()?;
        entries.sort_by_key(|e| e.file_name());
        let mut folders = Vec::new();
        for entry in entries {
            let rel = relative.join(entry.file_name());
            if entry.file_type()?.is_dir() {
                folders.push(rel.clone());
            }
            found.push((entry.path(), rel));
        }
        pending.extend(folders.into_iter().rev());
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    /// Unpacks a base64 tar.gz into (name, contents) in archive order (folders as None).
    fn unpack(b64: &str) -> Vec<(String, Option<String>)> {
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(b64)
            .expect("base64");
        let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(&bytes[..]));
        let mut files = Vec::new();
        for entry in archive.entries().expect("a tar") {
            let mut entry = entry.expect("an entry");
            let name = entry.path().unwrap().to_string_lossy().into_owned();
            let contents = if entry.header().entry_type().is_dir() {
                None
            } else {
                let mut text = String::new();
                entry.read_to_string(&mut text).unwrap();
                Some(text)
            };
            files.push((name, contents));
        }
        files
    }

    #[test]
    fn a_single_file_is_archived_under_its_own_name() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("hello.py");
        std::fs::write(&file, "def handle(ctx, payload):\n    return payload\n").unwrap();
        let files = unpack(&encode(&file).unwrap());
        assert_eq!(
            files,
            [(
                "hello.py".to_string(),
                Some("def handle(ctx, payload):\n    return payload\n".to_string())
            )]
        );
    }

    #[test]
    fn a_directory_is_archived_from_its_root_with_subfolders() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("hello.js"), "module.exports = 1").unwrap();
        std::fs::create_dir(dir.path().join("lib")).unwrap();
        std::fs::write(dir.path().join("lib").join("util.js"), "u").unwrap();
        let files = unpack(&encode(dir.path()).unwrap());
        let expected = [
            ("hello.js", Some("module.exports = 1")),
            ("lib", None),
            ("lib/util.js", Some("u")),
        ]
        .map(|(n, c)| (n.to_string(), c.map(str::to_string)));
        assert_eq!(files, expected);
    }

    #[test]
    fn entries_are_in_name_order_whatever_the_directory_order() {
        let dir = tempfile::tempdir().unwrap();
        for name in ["b.py", "a.py", "c.py"] {
            std::fs::write(dir.path().join(name), name).unwrap();
        }
        let names: Vec<String> = unpack(&encode(dir.path()).unwrap())
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        assert_eq!(names, ["a.py", "b.py", "c.py"]);
    }

    #[test]
    fn a_missing_path_is_an_error() {
        assert!(encode(Path::new("/nonexistent/hello.py")).is_err());
    }
}
