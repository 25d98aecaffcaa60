//! Repository names as attribution keys: whatever a sender calls a repository (a remote URL
//! in any of git's spellings, `host/owner/name`, or a salted hash of that) becomes one
//! normalised name, so that a hook's context and a pull request's webhook name it alike.

use sha2::{Digest, Sha256};

/// The most characters of a normalised name.
pub const MAX_LEN: usize = 255;

/// `https://github.com/Acme/Widgets.git`, `git@github.com:acme/widgets`,
/// `ssh://git@github.com:22/acme/widgets.git` and `github.com/acme/widgets` all become
/// `github.com/acme/widgets`: scheme, credentials, port and a trailing `.git` or `/` go, and
/// the rest is lower-cased (GitHub and GitLab compare names without case). A private name,
/// `sha256:` and 64 hex digits, is kept (lower-cased). `None` for anything else, e.g. a
/// local path, an empty host or path, whitespace or control characters. A name is its own
/// normal form: the projector normalises again what the doors stored, and a name that changed
/// then (`acme/..git.git` became `acme/..git` at the door and `acme/..` in the projector, which
/// dead-lettered it after a 202) is refused here.
pub fn normalize(raw: &str) -> Option<String> {
    let name = normalize_once(raw)?;
    (normalize_once(&name).as_deref() == Some(name.as_str())).then_some(name)
}

fn normalize_once(raw: &str) -> Option<String> {
    let s = raw.trim();
    if s.is_empty() || s.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return None;
    }
    if let Some(hex) = s.strip_prefix("sha256:") {
        return (hex.len() == 64 && hex.chars().all(|c| c.is_ascii_hexdigit()))
            .then(|| format!("sha256:{}", hex.to_ascii_lowercase()));
    }
    let (host, path) = if let Some((scheme, rest)) = s.split_once("://") {
        if scheme.is_empty() || scheme.eq_ignore_ascii_case("file") {
            return None;
        }
        let (authority, path) = rest.split_once('/')?;
        let host = authority.rsplit('@').next()?;
        (host.split(':').next()?, path)
    } else if let Some((left, path)) = s.split_once(':').filter(|(l, _)| !l.contains('/')) {
        // scp-like: [user@]host:owner/name
        (left.rsplit('@').next()?, path)
    } else {
        s.split_once('/')?
    };
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    if host.is_empty()
        || !host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-')
    {
        return None;
    }
    // Every trailing `.git` (in any case) and `/` goes: `x.git/.git` is `x`.
    let mut path = path.trim_matches('/').to_lowercase();
    while let Some(stripped) = path.strip_suffix(".git") {
        path = stripped.trim_end_matches('/').to_string();
    }
    if path.is_empty()
        || path
            .split('/')
            .any(|seg| seg.is_empty() || seg == "." || seg == "..")
    {
        return None;
    }
    let name = format!("{host}/{path}");
    (name.chars().count() <= MAX_LEN).then_some(name)
}

/// The private form of a normalised name or branch: `sha256:` and the hex SHA-256 of the
/// salt, a NUL and the text. The hook (`TALLY_HOOK_HASH=1`) and the webhook receivers (when
/// the tenant's integration has a salt) compute the same value.
pub fn private_name(salt: &str, text: &str) -> String {
    let mut h = Sha256::new();
    h.update(salt.as_bytes());
    h.update([0u8]);
    h.update(text.as_bytes());
    format!("sha256:{}", hex::encode(h.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_spelling_of_a_remote_is_one_name() {
        for raw in [
            "https://github.com/Acme/Widgets.git",
            "https://user:token@github.com/acme/widgets",
            "git@github.com:acme/widgets.git",
            "ssh://git@github.com:22/acme/widgets.git",
            "github.com/acme/widgets/",
            "  http://GitHub.com/acme/widgets  ",
        ] {
            assert_eq!(
                normalize(raw).as_deref(),
                Some("github.com/acme/widgets"),
                "{raw}"
            );
        }
        assert_eq!(
            normalize("https://gitlab.example.com/group/sub/project.git").as_deref(),
            Some("gitlab.example.com/group/sub/project")
        );
    }

    #[test]
    fn a_name_is_its_own_normal_form() {
        for (raw, name) in [
            ("github.com/acme/b.git.git", Some("github.com/acme/b")),
            ("github.com/acme/b.GIT", Some("github.com/acme/b")),
            ("github.com/acme/b.git/.git/", Some("github.com/acme/b")),
            ("github.com/acme/..git.git", None),
            ("github.com/acme/.git", Some("github.com/acme")),
            ("https://h/a:/b", Some("h/a:/b")),
            ("h/x:y", Some("h/x:y")),
        ] {
            assert_eq!(normalize(raw).as_deref(), name, "{raw}");
        }
        let tricky = [
            "github.com/acme/b.git.git",
            "GitHub.com./Acme/B.Git",
            "git@h:a/b.git/",
            "ssh://u@h:22/a/b.git.git",
            "h/a/.git/.git",
            "h/a::b",
            "h/a://b",
            "h./a",
            "h/x.git%2e",
        ];
        for raw in tricky {
            if let Some(name) = normalize(raw) {
                assert_eq!(normalize(&name).as_deref(), Some(name.as_str()), "{raw}");
            }
        }
    }

    #[test]
    fn what_is_not_a_remote_is_refused() {
        for raw in [
            "",
            "/home/me/repo",
            "file:///srv/git/repo.git",
            "github.com",
            "https://github.com/",
            "github.com/a b",
            "github.com/a\0b",
            "https://github.com/../etc",
            "sha256:abc",
            "ex ample.com/x",
        ] {
            assert_eq!(normalize(raw), None, "{raw:?}");
        }
        assert_eq!(normalize(&format!("github.com/{}", "a".repeat(300))), None);
    }

    #[test]
    fn private_names_are_kept_and_computed_alike() {
        let h = private_name("salt", "github.com/acme/widgets");
        assert_eq!(h.len(), 7 + 64);
        assert_eq!(
            normalize(&h.to_uppercase().replace("SHA256", "sha256")),
            Some(h.clone())
        );
        assert_ne!(h, private_name("other", "github.com/acme/widgets"));
    }
}
