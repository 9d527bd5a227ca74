//! Function code packages: zip archives checked and unpacked into the data dir.

use std::fs;
use std::io::{self, Read};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use base64::Engine as _;
use sha2::{Digest, Sha256};

/// Most entries in one package.
pub const MAX_ENTRIES: usize = 20_000;
/// Largest unpacked size of one package (Lambda's 250 MB).
pub const MAX_UNPACKED: u64 = 250 * 1024 * 1024;
/// Largest API request body the daemon reads (a create or code update carries the zip
/// base64-encoded in JSON).
pub const MAX_REQUEST: usize = 72 * 1024 * 1024;
/// Largest zip a create or code update can carry: what fits in [`MAX_REQUEST`] once
/// base64-encoded (4 bytes for 3), less 64 KiB for the rest of the JSON.
pub const MAX_ZIP: u64 = ((MAX_REQUEST as u64 - 64 * 1024) / 4) * 3;

/// Errors in a code package.
#[derive(Debug, thiserror::Error)]
pub enum CodeError {
    /// Not a readable zip archive.
    #[error("Could not unzip the code package: {0}")]
    BadZip(#[source] zip::result::ZipError),
    /// An entry would land outside the code directory, or is a link.
    #[error("Code package entry {0:?} is not allowed: paths must be relative, without '..', and not symlinks")]
    UnsafeEntry(String),
    /// Two entries have the same path (which one would win depends on the unzipper).
    #[error(
        "Code package holds entries with the same path ({0}): entries must have distinct paths"
    )]
    Duplicate(String),
    /// Too many entries or too large unpacked.
    #[error("Code package too large: {0}")]
    TooLarge(String),
    /// Writing the unpacked files failed.
    #[error("Could not store the code package")]
    Io(#[from] io::Error),
}

/// Digest of a package as Lambda reports it (`CodeSha256`: base64 of SHA-256) and as a hex
/// directory name.
pub fn digest(zip: &[u8]) -> (String, String) {
    let sum = Sha256::digest(zip);
    let hex = sum.iter().map(|b| format!("{b:02x}")).collect::<String>();
    (base64::engine::general_purpose::STANDARD.encode(sum), hex)
}

/// Unpacks `zip` into `dest` (created; must not exist). Returns the unpacked size.
/// Files are world-readable (the sandbox user reads them); nothing executable unless the
/// archive says so.
pub fn unpack(zip: &[u8], dest: &Path) -> Result<u64, CodeError> {
    let mut archive = zip::ZipArchive::new(io::Cursor::new(zip)).map_err(CodeError::BadZip)?;
    // The zip crate keys entries by name: of two with one name it keeps one without a word,
    // so compare with the count the archive's own directory gives.
    if let Some(n) = central_directory_entries(zip) {
        if n > archive.len() as u64 {
            return Err(CodeError::Duplicate(format!(
                "{n} entries under {} distinct paths",
                archive.len()
            )));
        }
    }
    if archive.len() > MAX_ENTRIES {
        return Err(CodeError::TooLarge(format!(
            "{} entries, at most {MAX_ENTRIES}",
            archive.len()
        )));
    }
    fs::create_dir(dest)?;
    fs::set_permissions(dest, fs::Permissions::from_mode(0o755))?;
    let mut total: u64 = 0;
    let mut seen = std::collections::HashSet::new();
    for i in 0..archive.len() {
        let mut entry = archive.by_index(i).map_err(CodeError::BadZip)?;
        let raw_name = entry.name().to_owned();
        if entry.is_symlink() {
            return Err(CodeError::UnsafeEntry(raw_name));
        }
        let rel = entry
            .enclosed_name()
            .ok_or_else(|| CodeError::UnsafeEntry(raw_name.clone()))?;
        let path = dest.join(&rel);
        let key = rel.to_string_lossy().trim_end_matches('/').to_owned();
        if !seen.insert(key.clone()) {
            return Err(CodeError::Duplicate(format!("{key:?} twice")));
        }
        if entry.is_dir() {
            fs::create_dir_all(&path)?;
            fs::set_permissions(&path, fs::Permissions::from_mode(0o755))?;
            continue;
        }
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent)?;
        }
        let exec = entry.unix_mode().is_some_and(|m| m & 0o111 != 0);
        let mut out = fs::File::create(&path)?;
        let budget = MAX_UNPACKED - total;
        let copied = io::copy(&mut (&mut entry).take(budget + 1), &mut out)?;
        total += copied;
        if total > MAX_UNPACKED {
            return Err(CodeError::TooLarge(format!(
                "more than {} MiB unpacked",
                MAX_UNPACKED >> 20
            )));
        }
        fs::set_permissions(
            &path,
            fs::Permissions::from_mode(if exec { 0o755 } else { 0o644 }),
        )?;
    }
    Ok(total)
}

/// Checks `zip` as [`unpack`] would (readable, safe paths, no duplicates, within the limits,
/// every entry's data intact) without writing anything: a dry run. Returns the unpacked size.
pub fn check(zip: &[u8]) -> Result<u64, CodeError> {
    let mut archive = zip::ZipArchive::new(io::Cursor::new(zip)).map_err(CodeError::BadZip)?;
    if let Some(n) = central_directory_entries(zip) {
        if n > archive.len() as u64 {
            return Err(CodeError::Duplicate(format!(
                "{n} entries under {} distinct paths",
                archive.len()
            )));
        }
    }
    if archive.len() > MAX_ENTRIES {
        return Err(CodeError::TooLarge(format!(
            "{} entries, at most {MAX_ENTRIES}",
            archive.len()
        )));
    }
    let mut total: u64 = 0;
    let mut seen = std::collections::HashSet::new();
    for i in 0..archive.len() {
        let mut entry = archive.by_index(i).map_err(CodeError::BadZip)?;
        let raw_name = entry.name().to_owned();
        if entry.is_symlink() {
            return Err(CodeError::UnsafeEntry(raw_name));
        }
        let rel = entry
            .enclosed_name()
            .ok_or_else(|| CodeError::UnsafeEntry(raw_name.clone()))?;
        let key = rel.to_string_lossy().trim_end_matches('/').to_owned();
        if !seen.insert(key.clone()) {
            return Err(CodeError::Duplicate(format!("{key:?} twice")));
        }
        let budget = MAX_UNPACKED - total;
        total += io::copy(&mut (&mut entry).take(budget + 1), &mut io::sink())?;
        if total > MAX_UNPACKED {
            return Err(CodeError::TooLarge(format!(
                "more than {} MiB unpacked",
                MAX_UNPACKED >> 20
            )));
        }
    }
    Ok(total)
}

/// The number of entries the archive's end-of-central-directory record declares (None: no
/// such record, or a ZIP64 archive that defers the count). Read by hand: no crate exposes it
/// (the zip crate folds entries of one name into one).
fn central_directory_entries(zip: &[u8]) -> Option<u64> {
    const EOCD: [u8; 4] = [0x50, 0x4b, 0x05, 0x06];
    const EOCD_LEN: usize = 22;
    // The record ends the file, followed by a comment of at most 65535 bytes.
    let tail_start = zip.len().saturating_sub(EOCD_LEN + 65_535);
    let tail = &zip[tail_start..];
    let at = (0..=tail.len().checked_sub(EOCD_LEN)?)
        .rev()
        .find(|&i| tail[i..i + 4] == EOCD)?;
    let total = u16::from_le_bytes([tail[at + 10], tail[at + 11]]);
    (total != u16::MAX).then_some(u64::from(total))
}

/// The files a function folder packages, `(path on disk, path in the package)`, sorted:
/// every regular file under `dir`, skipping `__pycache__`, `.git` and other hidden entries.
/// A symlink is followed when what it points to is inside `dir` (a directory it points to
/// is packaged under the link's name; one pointing to the folder or a parent is skipped);
/// one pointing outside is refused with its name. Stops after `MAX_ENTRIES + 1` files.
pub fn function_files(dir: &Path) -> io::Result<Vec<(std::path::PathBuf, String)>> {
    let root = dir.canonicalize()?;
    let mut stack = vec![dir.to_owned()];
    let mut files = Vec::new();
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d)? {
            let e = e?;
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') || name == "__pycache__" {
                continue;
            }
            let path = e.path();
            let rel = path
                .strip_prefix(dir)
                .map_err(io::Error::other)?
                .to_string_lossy()
                .into_owned();
            let mut ft = e.file_type()?;
            if ft.is_symlink() {
                let target = path.canonicalize().map_err(|err| {
                    io::Error::new(
                        err.kind(),
                        format!("symlink {rel} points to nothing that can be read ({err})"),
                    )
                })?;
                if !target.starts_with(&root) {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidInput,
                        format!(
                            "symlink {rel} points outside the function folder (to {}): copy what it points to into the folder",
                            target.display()
                        ),
                    ));
                }
                ft = fs::metadata(&target)?.file_type();
                let parent = d.canonicalize()?;
                if ft.is_dir() && parent.starts_with(&target) {
                    continue; // a link to the folder or one of its parents: a loop
                }
            }
            if ft.is_dir() {
                stack.push(path);
            } else if ft.is_file() {
                files.push((path, rel));
                if files.len() > MAX_ENTRIES {
                    // Enough to refuse the folder; links between directories could make
                    // the walk long.
                    return Ok(files);
                }
            }
        }
    }
    files.sort_by(|a, b| a.1.cmp(&b.1));
    Ok(files)
}

/// Zips a directory (for the CLI's `deploy` and for tests): the files [`function_files`]
/// lists.
pub fn zip_dir(dir: &Path) -> io::Result<Vec<u8>> {
    use std::io::Write;
    let files = function_files(dir)?;
    let mut buf = io::Cursor::new(Vec::new());
    {
        let mut w = zip::ZipWriter::new(&mut buf);
        for (f, rel) in files {
            let mode = fs::metadata(&f)?.permissions().mode();
            let opts = zip::write::SimpleFileOptions::default()
                .compression_method(zip::CompressionMethod::Deflated)
                .unix_permissions(mode & 0o777);
            w.start_file(rel, opts).map_err(io::Error::other)?;
            w.write_all(&fs::read(&f)?)?;
        }
        w.finish().map_err(io::Error::other)?;
    }
    Ok(buf.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn zip_of(entries: &[(&str, &[u8])]) -> Vec<u8> {
        let mut buf = io::Cursor::new(Vec::new());
        let mut w = zip::ZipWriter::new(&mut buf);
        for (name, data) in entries {
            w.start_file(*name, zip::write::SimpleFileOptions::default())
                .unwrap();
            w.write_all(data).unwrap();
        }
        w.finish().unwrap();
        buf.into_inner()
    }

    #[test]
    fn symlinks_inside_the_folder_are_followed_and_outside_refused_by_name() {
        let src = tempfile::tempdir().unwrap();
        let dir = src.path().join("f");
        fs::create_dir_all(dir.join("lib")).unwrap();
        fs::write(dir.join("lib/util.py"), "u = 1\n").unwrap();
        fs::write(dir.join("main.py"), "m = 1\n").unwrap();
        std::os::unix::fs::symlink("main.py", dir.join("alias.py")).unwrap();
        std::os::unix::fs::symlink("lib", dir.join("lib2")).unwrap();
        std::os::unix::fs::symlink(".", dir.join("loop")).unwrap();
        let names: Vec<String> = function_files(&dir)
            .unwrap()
            .into_iter()
            .map(|f| f.1)
            .collect();
        assert_eq!(
            names,
            ["alias.py", "lib/util.py", "lib2/util.py", "main.py"],
            "lib2 is followed, loop (the folder itself) is not"
        );
        let out = tempfile::tempdir().unwrap();
        unpack(&zip_dir(&dir).unwrap(), &out.path().join("c")).unwrap();
        assert_eq!(
            fs::read_to_string(out.path().join("c/alias.py")).unwrap(),
            "m = 1\n"
        );
        fs::write(src.path().join("secret"), "s").unwrap();
        std::os::unix::fs::symlink("../secret", dir.join("leak")).unwrap();
        let e = zip_dir(&dir).unwrap_err();
        assert!(
            e.to_string()
                .contains("symlink leak points outside the function folder"),
            "{e}"
        );
    }

    #[test]
    fn unpacks_and_round_trips() {
        let src = tempfile::tempdir().unwrap();
        fs::create_dir(src.path().join("pkg")).unwrap();
        fs::write(src.path().join("main.py"), "x = 1\n").unwrap();
        fs::write(src.path().join("pkg/mod.py"), "y = 2\n").unwrap();
        fs::create_dir(src.path().join("__pycache__")).unwrap();
        fs::write(src.path().join("__pycache__/junk.pyc"), "j").unwrap();
        let zip = zip_dir(src.path()).unwrap();
        let out = tempfile::tempdir().unwrap();
        let dest = out.path().join("code");
        let size = unpack(&zip, &dest).unwrap();
        assert_eq!(size, 12);
        assert_eq!(
            fs::read_to_string(dest.join("pkg/mod.py")).unwrap(),
            "y = 2\n"
        );
        assert!(!dest.join("__pycache__").exists());
        let mode = fs::metadata(dest.join("main.py"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o644);
    }

    #[test]
    fn refuses_traversal_and_garbage() {
        let out = tempfile::tempdir().unwrap();
        for bad in ["../evil.py", "/etc/passwd"] {
            let zip = zip_of(&[(bad, b"x")]);
            let err = unpack(&zip, &out.path().join(format!("d{}", bad.len()))).unwrap_err();
            assert!(matches!(err, CodeError::UnsafeEntry(_)), "{bad}: {err}");
        }
        let err = unpack(b"not a zip at all", &out.path().join("g")).unwrap_err();
        assert!(matches!(
            check(b"not a zip at all"),
            Err(CodeError::BadZip(_))
        ));
        assert!(matches!(
            check(&zip_of(&[("../evil.py", b"x")])),
            Err(CodeError::UnsafeEntry(_))
        ));
        assert_eq!(check(&zip_of(&[("ok.py", b"abc")])).unwrap(), 3);
        assert!(matches!(err, CodeError::BadZip(_)));
        assert!(err.to_string().contains("unzip"));
    }

    #[test]
    fn digest_is_lambda_shaped() {
        let (b64, hex) = digest(b"");
        assert_eq!(b64, "47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=");
        assert_eq!(hex.len(), 64);
    }
}
