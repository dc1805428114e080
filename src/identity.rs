//! Who a request is towards an upstream in `credentials = "client"` mode: the credentials a
//! client sent the mirror, the keyed hash that names them everywhere else ([`Identity`]), and
//! the tokens this mirror's token endpoint issues, so that clients that speak the Bearer flow
//! (dockerd, podman, skopeo) hand their credentials over once per token, not per request.
//!
//! Credentials live in memory only: in an issued token's entry (as long as the token lives)
//! and in the requests and downloads made with them. Everything that outlives those (logs,
//! confirmations, budgets, Redis) holds the [`Identity`] alone.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use hmac::{Hmac, Mac};
use http::HeaderValue;
use sha2::{Digest as _, Sha256};

use crate::secret::Secret;

/// How long a token of the mirror's token endpoint is good for; a client asks for a new one
/// (sending its credentials again) when it expires.
pub const TOKEN_LIFETIME: Duration = Duration::from_secs(300);

/// The most tokens held at once: a client that asks for tokens in a loop cannot grow memory
/// without bound (the oldest go first, and their clients ask again).
const MAX_TOKENS: u64 = 100_000;

/// One set of credentials for an upstream, as configured or as a client sent them.
#[derive(Debug, Clone)]
pub enum Credential {
    /// Sent as Basic auth, to the token realm or (for Basic-only registries) on every request.
    Password { username: String, password: Secret },
    /// An OAuth2 refresh token, exchanged at the token realm for an access token.
    IdentityToken(Secret),
}

/// A client's credentials named by a keyed hash of them (HMAC-SHA256 under a key of this
/// process, or of the fleet's cluster secret so that replicas agree). Printed as a short
/// prefix of the hash: enough to follow one client through the log, useless to anyone
/// without the key.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Identity([u8; 32]);

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(&self.0[..6]))
    }
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Identity({self})")
    }
}

/// A client's credentials with their identity.
pub struct ClientCredential {
    pub identity: Identity,
    pub credential: Credential,
}

/// On whose behalf an upstream request is made.
#[derive(Clone)]
pub enum Caller {
    /// The mirror's own configured credentials (anonymous without any): every request of an
    /// upstream in the default mode, and the mirror's own work (warm).
    Mirror,
    /// A client that sent no credentials, towards an upstream in client mode: anonymous.
    Anonymous,
    /// A client with its own credentials, towards an upstream in client mode.
    Client(Arc<ClientCredential>),
}

/// Whom an access confirmation is for: a [`Caller`] without its credentials.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum Who {
    Mirror,
    Anonymous,
    Client(Identity),
}

impl Caller {
    pub fn who(&self) -> Who {
        match self {
            Caller::Mirror => Who::Mirror,
            Caller::Anonymous => Who::Anonymous,
            Caller::Client(c) => Who::Client(c.identity),
        }
    }

    /// The client's own credentials, if any.
    pub fn credential(&self) -> Option<&Credential> {
        match self {
            Caller::Client(c) => Some(&c.credential),
            _ => None,
        }
    }
}

impl fmt::Display for Who {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Who::Mirror => f.write_str("mirror"),
            Who::Anonymous => f.write_str("anonymous"),
            Who::Client(id) => write!(f, "client:{id}"),
        }
    }
}

impl fmt::Debug for Caller {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Caller({})", self.who())
    }
}

/// Why a request's `Authorization` was not taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unrecognized {
    /// A Bearer token this mirror did not issue, or that expired: the client asks for a new
    /// one when challenged.
    UnknownToken,
    /// Not Basic or Bearer, or not decodable.
    Malformed,
}

/// A token issued by the mirror's token endpoint.
pub struct Issued {
    pub token: String,
    pub expires_in: Duration,
}

/// The identity key and the tokens issued to clients.
pub struct Clients {
    key: [u8; 32],
    /// Whether the mirror serves TLS: the scheme of the token endpoint it names.
    tls: bool,
    /// By a hash of the token (the token itself is not kept); `None` is an anonymous token.
    tokens: moka::sync::Cache<[u8; 32], Option<Arc<ClientCredential>>>,
}

impl Clients {
    /// `shared_key`: the fleet's secret, so that every replica names a client alike (the
    /// confirmations they share are keyed by it); a random key of this process otherwise.
    pub fn new(shared_key: Option<&Secret>, tls: bool) -> Clients {
        let key = match shared_key {
            Some(secret) => {
                let mut h = Sha256::new();
                h.update(b"pullthrough client identity\0");
                h.update(secret.expose().as_bytes());
                h.finalize().into()
            }
            None => random(),
        };
        Clients {
            key,
            tls,
            tokens: moka::sync::Cache::builder()
                .max_capacity(MAX_TOKENS)
                .time_to_live(TOKEN_LIFETIME)
                .build(),
        }
    }

    pub fn tls(&self) -> bool {
        self.tls
    }

    /// The credentials with their identity.
    pub fn identify(&self, credential: Credential) -> Arc<ClientCredential> {
        // A key of any length is accepted by HMAC: this cannot fail.
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&self.key)
            .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
        match &credential {
            Credential::Password { username, password } => {
                mac.update(b"password\0");
                mac.update(&(username.len() as u64).to_be_bytes());
                mac.update(username.as_bytes());
                mac.update(password.expose().as_bytes());
            }
            Credential::IdentityToken(token) => {
                mac.update(b"identity-token\0");
                mac.update(token.expose().as_bytes());
            }
        }
        let identity = Identity(mac.finalize().into_bytes().into());
        Arc::new(ClientCredential {
            identity,
            credential,
        })
    }

    /// The caller a request's `Authorization` names: none is [`Caller::Anonymous`]; Basic
    /// credentials are the client's own; a Bearer token must be one this mirror issued.
    pub fn caller(&self, authorization: Option<&HeaderValue>) -> Result<Caller, Unrecognized> {
        let Some(value) = authorization else {
            return Ok(Caller::Anonymous);
        };
        let value = value.to_str().map_err(|_| Unrecognized::Malformed)?;
        let (scheme, rest) = value
            .trim()
            .split_once(' ')
            .ok_or(Unrecognized::Malformed)?;
        if scheme.eq_ignore_ascii_case("bearer") {
            let key: [u8; 32] = Sha256::digest(rest.trim().as_bytes()).into();
            return match self.tokens.get(&key) {
                Some(Some(client)) => Ok(Caller::Client(client)),
                Some(None) => Ok(Caller::Anonymous),
                None => Err(Unrecognized::UnknownToken),
            };
        }
        if scheme.eq_ignore_ascii_case("basic") {
            return match basic(rest)? {
                Some(credential) => Ok(Caller::Client(self.identify(credential))),
                None => Ok(Caller::Anonymous),
            };
        }
        Err(Unrecognized::Malformed)
    }

    /// A new token for `client` (`None`: anonymous).
    pub fn issue(&self, client: Option<Arc<ClientCredential>>) -> Issued {
        let token = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(random());
        let key: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        self.tokens.insert(key, client);
        Issued {
            token,
            expires_in: TOKEN_LIFETIME,
        }
    }
}

/// `user:password` of a Basic `Authorization`; an empty user and password is anonymous (what
/// some clients send when they have nothing).
pub fn basic(encoded: &str) -> Result<Option<Credential>, Unrecognized> {
    let raw = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .map_err(|_| Unrecognized::Malformed)?;
    let text = String::from_utf8(raw).map_err(|_| Unrecognized::Malformed)?;
    let (username, password) = text.split_once(':').ok_or(Unrecognized::Malformed)?;
    if username.is_empty() && password.is_empty() {
        return Ok(None);
    }
    if password.is_empty() {
        return Err(Unrecognized::Malformed);
    }
    Ok(Some(Credential::Password {
        username: username.to_owned(),
        password: Secret::new(password),
    }))
}

fn random() -> [u8; 32] {
    let mut key = [0u8; 32];
    // The OS's random source failing is a broken machine: no identity or token is safe then.
    getrandom::fill(&mut key).unwrap_or_else(|e| panic!("no OS randomness: {e}"));
    key
}

#[cfg(test)]
mod tests {
    use super::*;

    fn basic_header(user: &str, pass: &str) -> HeaderValue {
        let v = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"));
        HeaderValue::from_str(&format!("Basic {v}")).unwrap()
    }

    #[test]
    fn the_same_credentials_are_one_identity_and_others_are_not() {
        let clients = Clients::new(None, false);
        let a = clients.caller(Some(&basic_header("a", "pw"))).unwrap();
        let a2 = clients.caller(Some(&basic_header("a", "pw"))).unwrap();
        let b = clients.caller(Some(&basic_header("a", "other"))).unwrap();
        assert_eq!(a.who(), a2.who());
        assert_ne!(a.who(), b.who());
        // Another key names the same credentials differently.
        let elsewhere = Clients::new(None, false)
            .caller(Some(&basic_header("a", "pw")))
            .unwrap();
        assert_ne!(a.who(), elsewhere.who());
    }

    #[test]
    fn replicas_with_one_secret_agree_on_identities() {
        let secret = Secret::new("fleet");
        let one = Clients::new(Some(&secret), false);
        let two = Clients::new(Some(&secret), false);
        let h = basic_header("a", "pw");
        assert_eq!(
            one.caller(Some(&h)).unwrap().who(),
            two.caller(Some(&h)).unwrap().who()
        );
    }

    #[test]
    fn issued_tokens_name_their_client_and_unknown_ones_are_refused() {
        let clients = Clients::new(None, false);
        let Caller::Client(c) = clients.caller(Some(&basic_header("a", "pw"))).unwrap() else {
            panic!("basic credentials are a client");
        };
        let issued = clients.issue(Some(c.clone()));
        let bearer = HeaderValue::from_str(&format!("Bearer {}", issued.token)).unwrap();
        assert_eq!(
            clients.caller(Some(&bearer)).unwrap().who(),
            Who::Client(c.identity)
        );
        let anonymous = clients.issue(None);
        let bearer = HeaderValue::from_str(&format!("Bearer {}", anonymous.token)).unwrap();
        assert_eq!(clients.caller(Some(&bearer)).unwrap().who(), Who::Anonymous);
        let forged = HeaderValue::from_static("Bearer not-issued");
        assert_eq!(
            clients.caller(Some(&forged)).unwrap_err(),
            Unrecognized::UnknownToken
        );
        assert_eq!(clients.caller(None).unwrap().who(), Who::Anonymous);
    }

    #[test]
    fn printing_a_caller_shows_no_credential() {
        let clients = Clients::new(None, false);
        let caller = clients
            .caller(Some(&basic_header("alice", "s3cret-pass")))
            .unwrap();
        let shown = format!("{caller:?} {}", caller.who());
        assert!(
            !shown.contains("alice") && !shown.contains("s3cret"),
            "{shown}"
        );
    }
}
