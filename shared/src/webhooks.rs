//! Outgoing notifications: where they may go (HTTPS to public addresses, unless the operator
//! allows loopback or private networks), how a webhook is signed (the Standard Webhooks
//! specification: `webhook-id`, `webhook-timestamp`, `webhook-signature` = `v1,` + base64 of
//! HMAC-SHA256 over `id.timestamp.body`, with `whsec_` secrets), and what Slack is sent
//! (a Block Kit message linking back to the dashboard).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use serde_json::{json, Value};
use sha2::Sha256;

/// Longest URL a channel may have.
pub const MAX_URL_LEN: usize = 2048;
/// Prefix of a signing secret.
pub const SECRET_PREFIX: &str = "whsec_";

/// Which destinations the operator allows besides public HTTPS ones.
#[derive(Debug, Clone, Copy, Default)]
pub struct Policy {
    /// `http://` to loopback addresses (tests, a receiver on the same host).
    pub allow_loopback: bool,
    /// Private, shared and unique-local ranges (an internal receiver).
    pub allow_private: bool,
}

impl Policy {
    /// Whether a notification may be sent to `ip`. Never: unspecified, multicast,
    /// broadcast, link-local (which holds cloud metadata services, 169.254.169.254) and the
    /// documentation ranges; loopback and private only when allowed.
    pub fn allows(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
            v4 => v4,
        };
        match ip {
            IpAddr::V4(v4) => self.allows_v4(v4),
            IpAddr::V6(v6) => self.allows_v6(v6),
        }
    }

    fn allows_v4(&self, ip: Ipv4Addr) -> bool {
        let [a, b, c, _] = ip.octets();
        if ip.is_unspecified()
            || ip.is_multicast()
            || ip.is_broadcast()
            || ip.is_link_local()
            || ip.is_documentation()
            || a == 0
            || a >= 240
            || (a == 192 && b == 0 && c == 0)
            || (a == 198 && (b == 18 || b == 19))
        {
            return false;
        }
        if ip.is_loopback() {
            return self.allow_loopback;
        }
        let shared = a == 100 && (64..128).contains(&b);
        if ip.is_private() || shared {
            return self.allow_private;
        }
        true
    }

    fn allows_v6(&self, ip: Ipv6Addr) -> bool {
        let first = ip.segments()[0];
        let s = ip.segments();
        // An IPv4 address in IPv4-compatible (::a.b.c.d, deprecated) or IPv4-translated
        // (::ffff:0:a.b.c.d) form: never a public destination (mapped ones were taken as IPv4
        // above; ::1 is loopback).
        let embeds_v4 = s[..6] == [0; 6] || (s[..4] == [0; 4] && s[4] == 0xffff && s[5] == 0);
        if ip.is_unspecified()
            || (embeds_v4 && !ip.is_loopback())
            || ip.is_multicast()
            || (first & 0xffc0) == 0xfe80
            || first == 0x2001 && ip.segments()[1] == 0x0db8
            || first == 0x0064
        {
            return false;
        }
        if ip.is_loopback() {
            return self.allow_loopback;
        }
        if (first & 0xfe00) == 0xfc00 {
            // Unique local, which also holds AWS's metadata address fd00:ec2::254.
            return self.allow_private && ip != Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254);
        }
        true
    }

    /// Checks a channel's URL before it is stored or used: `https://` (or `http://` to a
    /// loopback host when allowed), a host, no credentials, at most [`MAX_URL_LEN`] bytes,
    /// and, where the host is an address, an allowed one. Names are checked when resolved
    /// ([`Policy::resolve`]).
    pub fn check_url(&self, raw: &str) -> Result<url::Url, String> {
        if raw.len() > MAX_URL_LEN {
            return Err(format!("at most {MAX_URL_LEN} bytes"));
        }
        let url = url::Url::parse(raw).map_err(|e| format!("not a URL: {e}"))?;
        if !url.username().is_empty() || url.password().is_some() {
            return Err("must not carry credentials".into());
        }
        let host = url.host().ok_or("must name a host")?;
        let ip = match host {
            url::Host::Ipv4(v4) => Some(IpAddr::V4(v4)),
            url::Host::Ipv6(v6) => Some(IpAddr::V6(v6)),
            url::Host::Domain(_) => None,
        };
        let loopback_name =
            matches!(host, url::Host::Domain(d) if d.eq_ignore_ascii_case("localhost"));
        match url.scheme() {
            "https" => {}
            "http"
                if self.allow_loopback
                    && (loopback_name || ip.is_some_and(|i| i.is_loopback())) => {}
            _ => return Err("must be an https:// URL".into()),
        }
        if loopback_name && !self.allow_loopback {
            return Err("must not point at this host".into());
        }
        if let Some(ip) = ip {
            if !self.allows(ip) {
                return Err(format!(
                    "must not point at a private or reserved address ({ip})"
                ));
            }
        }
        Ok(url)
    }

    /// Resolves `host` and keeps only the addresses this policy allows; an error when none
    /// is left (the name points at a private, link-local or metadata address).
    pub async fn resolve(&self, host: &str, port: u16) -> Result<Vec<SocketAddr>, String> {
        let found: Vec<SocketAddr> = tokio::net::lookup_host((host, port))
            .await
            .map_err(|e| format!("{host} does not resolve: {e}"))?
            .collect();
        let allowed: Vec<SocketAddr> = found
            .iter()
            .copied()
            .filter(|a| self.allows(a.ip()))
            .collect();
        if allowed.is_empty() {
            return Err(format!(
                "{host} resolves to private or reserved addresses only ({})",
                found
                    .iter()
                    .map(|a| a.ip().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        Ok(allowed)
    }

    /// An HTTP client for notifications: every name it connects to is resolved through
    /// [`Policy::resolve`] (so a name cannot be re-pointed at an internal address after it
    /// was checked), no redirects are followed, and every request times out.
    pub fn client(self, timeout: std::time::Duration) -> reqwest::Result<reqwest::Client> {
        reqwest::Client::builder()
            .dns_resolver(Arc::new(Resolver(self)))
            // A proxy from the environment would resolve names itself, past the policy.
            .no_proxy()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(timeout)
            .connect_timeout(timeout.min(std::time::Duration::from_secs(5)))
            .pool_max_idle_per_host(2)
            .user_agent(concat!("Tally-Webhooks/", env!("CARGO_PKG_VERSION")))
            .build()
    }
}

struct Resolver(Policy);

impl reqwest::dns::Resolve for Resolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let policy = self.0;
        Box::pin(async move {
            let addrs = policy
                .resolve(name.as_str(), 0)
                .await
                .map_err(|e| -> Box<dyn std::error::Error + Send + Sync> { e.into() })?;
            Ok(Box::new(addrs.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

/// A channel's sealed part (`control.channels.sealed`): its URL (a Slack URL is itself a
/// credential) and signing secrets, newest first; an older one signs too until it expires.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct ChannelSecrets {
    pub url: String,
    #[serde(default)]
    pub secrets: Vec<SigningSecret>,
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct SigningSecret {
    pub secret: String,
    pub expires_at: Option<chrono::DateTime<chrono::Utc>>,
}

impl ChannelSecrets {
    pub fn seal(&self, key: &crate::secretbox::SecretKey) -> Vec<u8> {
        key.seal(&serde_json::to_vec(self).expect("plain data serialises"))
    }

    pub fn open(key: &crate::secretbox::SecretKey, sealed: &[u8]) -> Option<ChannelSecrets> {
        serde_json::from_slice(&key.open(sealed)?).ok()
    }

    /// The secrets that sign at `now`.
    pub fn signing(&self, now: chrono::DateTime<chrono::Utc>) -> Vec<&str> {
        self.secrets
            .iter()
            .filter(|s| s.expires_at.is_none_or(|t| t > now))
            .map(|s| s.secret.as_str())
            .collect()
    }

    /// Puts a new secret first; the current ones stay valid until `keep_until` (and
    /// those already expired go).
    pub fn rotate(
        &mut self,
        keep_until: chrono::DateTime<chrono::Utc>,
        now: chrono::DateTime<chrono::Utc>,
    ) -> String {
        self.secrets
            .retain(|s| s.expires_at.is_none_or(|t| t > now));
        for s in &mut self.secrets {
            s.expires_at = Some(s.expires_at.map_or(keep_until, |t| t.min(keep_until)));
        }
        let secret = new_secret();
        self.secrets.insert(
            0,
            SigningSecret {
                secret: secret.clone(),
                expires_at: None,
            },
        );
        secret
    }
}

/// A new signing secret: `whsec_` and 32 random bytes in base64.
pub fn new_secret() -> String {
    let mut bytes = [0u8; 32];
    rand::RngCore::fill_bytes(&mut rand::rng(), &mut bytes);
    format!("{SECRET_PREFIX}{}", B64.encode(bytes))
}

/// The `webhook-signature` header for a message: one `v1,…` per secret, space-separated
/// (during a rotation both the new and the old secret sign). Secrets that are not
/// `whsec_` + base64 are skipped.
pub fn signature(secrets: &[&str], id: &str, timestamp: i64, body: &[u8]) -> String {
    let mut out = Vec::new();
    for secret in secrets {
        let Some(key) = secret
            .strip_prefix(SECRET_PREFIX)
            .and_then(|k| B64.decode(k).ok())
        else {
            continue;
        };
        let mut mac = Hmac::<Sha256>::new_from_slice(&key).expect("HMAC takes any key length");
        mac.update(id.as_bytes());
        mac.update(b".");
        mac.update(timestamp.to_string().as_bytes());
        mac.update(b".");
        mac.update(body);
        out.push(format!("v1,{}", B64.encode(mac.finalize().into_bytes())));
    }
    out.join(" ")
}

/// Whether `header` (a `webhook-signature` value) holds a valid signature of the message by
/// `secret`, as a receiver checks it.
pub fn verify(secret: &str, header: &str, id: &str, timestamp: i64, body: &[u8]) -> bool {
    let want = signature(&[secret], id, timestamp, body);
    !want.is_empty() && header.split(' ').any(|s| s == want)
}

/// The Slack incoming-webhook message of a notification: a header, the summary and its
/// facts, and a button back to the dashboard. Texts are cut to Block Kit's limits (header
/// 150 characters, section 3000, field 2000, button 75).
pub fn slack_message(title: &str, summary: &str, facts: &[(String, String)], link: &str) -> Value {
    let cut = |s: &str, n: usize| -> String {
        match s.char_indices().nth(n.saturating_sub(1)) {
            Some((i, _)) if s.chars().count() > n => format!("{}…", &s[..i]),
            _ => s.to_string(),
        }
    };
    let mut blocks = vec![
        json!({"type": "header", "text": {"type": "plain_text", "text": cut(title, 150), "emoji": true}}),
        json!({"type": "section", "text": {"type": "mrkdwn", "text": cut(summary, 3000)}}),
    ];
    if !facts.is_empty() {
        let fields: Vec<Value> = facts
            .iter()
            .take(10)
            .map(|(k, v)| json!({"type": "mrkdwn", "text": cut(&format!("*{k}*\n{v}"), 2000)}))
            .collect();
        blocks.push(json!({"type": "section", "fields": fields}));
    }
    if link.starts_with("https://") || link.starts_with("http://") {
        blocks.push(json!({"type": "actions", "elements": [{
            "type": "button",
            "text": {"type": "plain_text", "text": "Open in Tally"},
            "url": cut(link, 3000),
        }]}));
    }
    json!({"text": cut(&format!("{title}: {summary}"), 3000), "blocks": blocks})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_follow_the_standard_webhooks_example() {
        // The specification's published example.
        let secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
        let body = br#"{"test": 2432232314}"#;
        let sig = signature(&[secret], "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body);
        assert_eq!(sig, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
        assert!(verify(
            secret,
            &format!("v1,bogus {sig}"),
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            1614265330,
            body
        ));
        assert!(!verify(secret, &sig, "msg_other", 1614265330, body));
        let both = signature(&[&new_secret(), secret], "m", 1, b"x");
        assert_eq!(both.split(' ').count(), 2);
        assert!(verify(secret, &both, "m", 1, b"x"));
    }

    #[test]
    fn only_public_addresses_unless_allowed() {
        let strict = Policy::default();
        for ip in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "::1",
            "fe80::1",
            "fd00:ec2::254",
            "::ffff:10.0.0.1",
            "::169.254.169.254",
            "::8.8.8.8",
            "::ffff:0:169.254.169.254",
            "224.0.0.1",
        ] {
            assert!(!strict.allows(ip.parse().unwrap()), "{ip}");
        }
        for ip in ["1.1.1.1", "2606:4700:4700::1111", "::ffff:8.8.8.8"] {
            assert!(strict.allows(ip.parse().unwrap()), "{ip}");
        }
        let open = Policy {
            allow_loopback: true,
            allow_private: true,
        };
        assert!(open.allows("127.0.0.1".parse().unwrap()));
        assert!(open.allows("10.0.0.1".parse().unwrap()));
        assert!(
            !open.allows("169.254.169.254".parse().unwrap()),
            "metadata stays refused"
        );
        assert!(!open.allows("fd00:ec2::254".parse().unwrap()));
    }

    #[test]
    fn urls_must_be_https_to_allowed_hosts() {
        let strict = Policy::default();
        assert!(strict.check_url("https://hooks.example.com/x").is_ok());
        for bad in [
            "http://hooks.example.com/x",
            "https://user:pw@hooks.example.com/",
            "https://10.0.0.5/hook",
            "https://[::1]/hook",
            "https://169.254.169.254/latest",
            "https://localhost/x",
            "ftp://example.com/",
            "not a url",
        ] {
            assert!(strict.check_url(bad).is_err(), "{bad}");
        }
        let tests = Policy {
            allow_loopback: true,
            allow_private: false,
        };
        assert!(tests.check_url("http://127.0.0.1:9000/hook").is_ok());
        assert!(tests.check_url("http://localhost:9000/hook").is_ok());
        assert!(tests.check_url("http://10.0.0.1/hook").is_err());
        assert!(strict
            .check_url(&format!("https://e.com/{}", "a".repeat(MAX_URL_LEN)))
            .is_err());
    }

    #[test]
    fn slack_texts_are_cut_to_block_kit_limits() {
        let m = slack_message(
            &"t".repeat(400),
            "s",
            &[("k".into(), "v".into())],
            "https://x/d",
        );
        let header = m["blocks"][0]["text"]["text"].as_str().unwrap();
        assert_eq!(header.chars().count(), 150);
        assert_eq!(m["blocks"][3]["elements"][0]["url"], "https://x/d");
    }
}
