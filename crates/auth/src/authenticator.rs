//! Turning a request's credentials into an [`Identity`]: Basic credentials
//! (htpasswd users, API tokens), Bearer tokens (Berth's own, an external
//! issuer's, a peer region's secret) and client certificates.
//!
//! Checks that cost something are cached: a verified password for
//! [`AuthSettings::credential_ttl`] (keyed by a SHA-256 of the credentials,
//! so the cache holds no password), a verified JWT until it expires. Failed
//! attempts are throttled per client address and user name.

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use sha2::{Digest as _, Sha256};
use subtle::ConstantTimeEq;

use crate::apitoken::{self, ApiTokens};
use crate::header::{Credentials, HeaderError, parse_authorization};
use crate::htpasswd::Htpasswd;
use crate::identity::Identity;
use crate::jwt::{self, Claims, JwtError, KeySet, PrincipalKind};
use crate::keystore::KeyStore;
use crate::policy::Policy;
use crate::throttle::LoginThrottle;
use crate::turns::Turns;

pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// An existing token server whose tokens this registry accepts (docker_auth,
/// Harbor, GitLab): its `access` claims are enforced exactly.
pub struct ExternalIssuer {
    pub realm: String,
    pub service: String,
    pub issuer: String,
    pub keys: KeySet,
}

/// How a peer region proves who it is: a secret it presents as a Bearer
/// token, or the subject (CN) of its client certificate.
#[derive(Clone)]
pub struct PeerCredential {
    pub name: String,
    pub secret: Option<String>,
    pub certificate: Option<String>,
}

pub struct AuthSettings {
    /// Authentication is configured: everything not granted is denied.
    /// Without it the registry is open (only loopback, or an explicit
    /// opt-in) and only peer credentials are checked.
    pub enabled: bool,
    pub policy: Policy,
    /// Challenges name the built-in token endpoint (else Basic).
    pub token_service: bool,
    /// `iss` of Berth's tokens.
    pub issuer: String,
    /// `service` of the challenge and `aud` of Berth's tokens.
    pub service: String,
    pub token_ttl: Duration,
    pub external: Option<ExternalIssuer>,
    pub peers: Vec<PeerCredential>,
    /// How long a verified password is remembered.
    pub credential_ttl: Duration,
}

#[derive(Debug)]
pub enum AuthFailure {
    /// Wrong password, unknown user, or an unknown, revoked or expired API
    /// token.
    BadCredentials {
        user: String,
    },
    /// A Bearer token that does not verify.
    InvalidToken(JwtError),
    Malformed(HeaderError),
    /// Too many failures from this address or for this user (named when
    /// the attempt named one).
    Throttled {
        wait: Duration,
        user: Option<String>,
    },
    /// Credentials could not be checked now (the MetaStore failed).
    Unavailable(String),
}

impl std::fmt::Display for AuthFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AuthFailure::BadCredentials { .. } => f.write_str("invalid user name or password"),
            AuthFailure::InvalidToken(e) => write!(f, "invalid token: {e}"),
            AuthFailure::Malformed(e) => e.fmt(f),
            AuthFailure::Throttled { wait, .. } => write!(
                f,
                "too many failed sign-ins; retry in {} s",
                (wait.as_secs() + u64::from(wait.subsec_nanos() > 0)).max(1)
            ),
            AuthFailure::Unavailable(why) => write!(f, "cannot check credentials now: {why}"),
        }
    }
}

/// What a request offers to prove who it is.
pub struct AuthRequest<'a> {
    pub authorization: Option<&'a [u8]>,
    /// The verified client certificate's subject (CN).
    pub certificate: Option<&'a str>,
    pub client: IpAddr,
}

#[derive(Clone)]
struct CachedUser {
    user: Arc<str>,
    generation: u64,
    until: Instant,
}

/// A credential that failed: its repetitions are refused from memory.
#[derive(Clone)]
struct FailedCredential {
    generation: u64,
    until: Instant,
}

/// How long a failed credential is remembered: a client retrying the same
/// wrong password is refused at once, without bcrypt and without counting
/// again (the same password again is no new guess).
const FAILED_TTL: Duration = Duration::from_secs(60);

#[derive(Clone)]
struct CachedToken {
    identity: Identity,
    exp: u64,
}

pub struct Authenticator {
    settings: AuthSettings,
    htpasswd: RwLock<Option<Arc<Htpasswd>>>,
    generation: AtomicU64,
    passwords: quick_cache::sync::Cache<[u8; 32], CachedUser>,
    failed: quick_cache::sync::Cache<[u8; 32], FailedCredential>,
    jwts: quick_cache::sync::Cache<String, CachedToken>,
    keys: Option<Arc<KeyStore>>,
    tokens: Option<Arc<ApiTokens>>,
    throttle: LoginThrottle,
    /// Credentials being checked now.
    checking: Turns<[u8; 32]>,
    /// bcrypt checks at once; more wait (each costs tens of milliseconds of
    /// one core).
    bcrypt_slots: tokio::sync::Semaphore,
}

fn credential_hash(user: &str, password: &str) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(user.as_bytes());
    h.update([0]);
    h.update(password.as_bytes());
    h.finalize().into()
}

fn looks_like_jwt(token: &str) -> bool {
    token.bytes().filter(|b| *b == b'.').count() == 2
}

impl Authenticator {
    pub fn new(
        settings: AuthSettings,
        htpasswd: Option<Htpasswd>,
        keys: Option<Arc<KeyStore>>,
        tokens: Option<Arc<ApiTokens>>,
    ) -> Authenticator {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        Authenticator {
            settings,
            htpasswd: RwLock::new(htpasswd.map(Arc::new)),
            generation: AtomicU64::new(0),
            passwords: quick_cache::sync::Cache::new(16_384),
            failed: quick_cache::sync::Cache::new(16_384),
            jwts: quick_cache::sync::Cache::new(16_384),
            keys,
            tokens,
            throttle: LoginThrottle::default(),
            checking: Turns::default(),
            bcrypt_slots: tokio::sync::Semaphore::new(cores.max(2)),
        }
    }

    pub fn settings(&self) -> &AuthSettings {
        &self.settings
    }

    pub fn enabled(&self) -> bool {
        self.settings.enabled
    }

    pub fn policy(&self) -> &Policy {
        &self.settings.policy
    }

    pub fn keys(&self) -> Option<&Arc<KeyStore>> {
        self.keys.as_ref()
    }

    pub fn api_tokens(&self) -> Option<&Arc<ApiTokens>> {
        self.tokens.as_ref()
    }

    /// Replaces the htpasswd users (a reload); remembered passwords are
    /// forgotten.
    pub fn set_htpasswd(&self, file: Htpasswd) {
        *self.htpasswd.write().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(file));
        self.generation.fetch_add(1, Ordering::AcqRel);
        self.passwords.clear();
        self.failed.clear();
        self.jwts.clear();
    }

    /// Whether the htpasswd file has this user.
    pub fn knows_user(&self, user: &str) -> bool {
        self.htpasswd().is_some_and(|f| f.contains(user))
    }

    /// A digest of the user's htpasswd entry (see [`Htpasswd::fingerprint`]).
    pub fn user_fingerprint(&self, user: &str) -> Option<String> {
        self.htpasswd()?.fingerprint(user)
    }

    fn htpasswd(&self) -> Option<Arc<Htpasswd>> {
        self.htpasswd
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Checks a request's credentials.
    pub async fn authenticate(&self, request: &AuthRequest<'_>) -> Result<Identity, AuthFailure> {
        let Some(header) = request.authorization else {
            return Ok(self.certificate_identity(request.certificate));
        };
        // The hot path: a token verified before, found without parsing or
        // copying the header.
        if self.settings.enabled
            && let Some(identity) = self.remembered_bearer(header)
        {
            return identity.map_err(AuthFailure::InvalidToken);
        }
        let credentials = match parse_authorization(header) {
            Ok(c) => c,
            Err(e) if self.settings.enabled => return Err(AuthFailure::Malformed(e)),
            // An open registry ignores what it does not check.
            Err(_) => return Ok(self.certificate_identity(request.certificate)),
        };
        match credentials {
            Credentials::Bearer(token) => {
                if let Some(peer) = self.peer_by_secret(&token) {
                    return Ok(Identity::Peer(peer));
                }
                if !self.settings.enabled {
                    return Ok(self.certificate_identity(request.certificate));
                }
                // Not throttled: a token cannot be guessed, and refusing a
                // bad one costs about what serving a request does (a valid
                // token must never wait behind someone else's garbage).
                self.verify_bearer(&token)
                    .await
                    .map_err(AuthFailure::InvalidToken)
            }
            Credentials::Basic { username, password } => {
                if !self.settings.enabled {
                    return Ok(self.certificate_identity(request.certificate));
                }
                self.basic(&username, &password, request.client).await
            }
        }
    }

    fn certificate_identity(&self, certificate: Option<&str>) -> Identity {
        let Some(subject) = certificate else {
            return Identity::Anonymous;
        };
        if let Some(peer) = self
            .settings
            .peers
            .iter()
            .find(|p| p.certificate.as_deref() == Some(subject))
        {
            return Identity::Peer(peer.name.clone());
        }
        if self.settings.enabled {
            Identity::Certificate(subject.to_string())
        } else {
            Identity::Anonymous
        }
    }

    /// Whether the credential that names peer `name` (its secret or its
    /// certificate) names peer `other` too: a secret shared by several
    /// peers proves only that the caller is one of them.
    pub fn peer_credential_shared(&self, name: &str, other: &str) -> bool {
        let find = |n: &str| self.settings.peers.iter().find(|p| p.name == n);
        match (find(name), find(other)) {
            (Some(a), Some(b)) if a.name == b.name => true,
            (Some(a), Some(b)) => {
                (a.secret.is_some() && a.secret == b.secret)
                    || (a.certificate.is_some() && a.certificate == b.certificate)
            }
            _ => false,
        }
    }

    fn peer_by_secret(&self, presented: &str) -> Option<String> {
        let mut found = None;
        // Every secret is compared, in constant time, whatever matched.
        for peer in &self.settings.peers {
            if let Some(secret) = &peer.secret {
                let equal: bool = presented.as_bytes().ct_eq(secret.as_bytes()).into();
                if equal && found.is_none() {
                    found = Some(peer.name.clone());
                }
            }
        }
        found
    }

    /// Checks Basic credentials: an API token secret, or an htpasswd user.
    pub async fn basic(
        &self,
        username: &str,
        password: &str,
        client: IpAddr,
    ) -> Result<Identity, AuthFailure> {
        let key = credential_hash(username, password);
        if let Some(known) = self.remembered_basic(&key, username, password) {
            return known;
        }
        // One check per credential at a time: a client that opens sixteen
        // connections with one password pays one bcrypt and one throttle
        // token, and the others take its answer from memory (the same
        // password again is no new guess).
        let _turn = self.checking.turn(key).await;
        if let Some(known) = self.remembered_basic(&key, username, password) {
            return known;
        }
        self.check_basic(key, username, password, client).await
    }

    /// The answer for a credential checked recently, if there is one.
    fn remembered_basic(
        &self,
        key: &[u8; 32],
        username: &str,
        password: &str,
    ) -> Option<Result<Identity, AuthFailure>> {
        let generation = self.generation.load(Ordering::Acquire);
        // A credential verified recently passes before any throttle: the
        // clients using it are not held up by someone guessing it.
        if let Some(hit) = self.passwords.get(key)
            && hit.generation == generation
            && hit.until > Instant::now()
            && &*hit.user == username
        {
            return Some(Ok(Identity::User(username.to_string())));
        }
        if let Some(miss) = self.failed.get(key)
            && miss.generation == generation
            && miss.until > Instant::now()
        {
            return Some(Err(AuthFailure::BadCredentials {
                user: username.to_string(),
            }));
        }
        // An API token this node knows passes from memory, before any
        // throttle (its lookup costs nothing to protect).
        if apitoken::looks_like_secret(password)
            && let Some(tokens) = &self.tokens
            && let Some(token) = tokens.known(password, now_ms())
        {
            return Some(Ok(Identity::ApiToken(token)));
        }
        None
    }

    /// Checks a credential not in memory: throttled, then bcrypt or the
    /// stored API tokens.
    async fn check_basic(
        &self,
        key: [u8; 32],
        username: &str,
        password: &str,
        client: IpAddr,
    ) -> Result<Identity, AuthFailure> {
        let generation = self.generation.load(Ordering::Acquire);
        // Tokens are taken before anything is checked (so attempts sent at
        // once wait like attempts sent one by one) and given back on
        // success: only failures use them up.
        let attempt =
            self.throttle
                .begin(client, username)
                .map_err(|wait| AuthFailure::Throttled {
                    wait,
                    user: Some(username.to_string()),
                })?;
        let fail = || {
            self.failed.insert(
                key,
                FailedCredential {
                    generation,
                    until: Instant::now() + FAILED_TTL,
                },
            );
            AuthFailure::BadCredentials {
                user: username.to_string(),
            }
        };
        if apitoken::looks_like_secret(password) {
            let Some(tokens) = &self.tokens else {
                return Err(fail());
            };
            return match tokens.lookup(password, now_ms()).await {
                Ok(Some(token)) => {
                    self.throttle.succeeded(attempt);
                    Ok(Identity::ApiToken(token))
                }
                Ok(None) => Err(fail()),
                Err(e) => {
                    // Not a failure of the credential.
                    self.throttle.succeeded(attempt);
                    Err(AuthFailure::Unavailable(e.to_string()))
                }
            };
        }
        let Some(file) = self.htpasswd() else {
            return Err(fail());
        };
        let verified = {
            let _slot = self.bcrypt_slots.acquire().await.ok();
            let (user, pass) = (username.to_string(), password.to_string());
            tokio::task::spawn_blocking(move || file.verify(&user, &pass))
                .await
                .unwrap_or(false)
        };
        if !verified {
            return Err(fail());
        }
        self.throttle.succeeded(attempt);
        self.passwords.insert(
            key,
            CachedUser {
                user: username.into(),
                generation,
                until: Instant::now() + self.settings.credential_ttl,
            },
        );
        Ok(Identity::User(username.to_string()))
    }

    /// A verified token's identity from the cache, if the header carries
    /// one (`None`: not a remembered token; parse it).
    fn remembered_bearer(&self, header: &[u8]) -> Option<Result<Identity, JwtError>> {
        let rest = header
            .strip_prefix(b"Bearer ")
            .or_else(|| header.strip_prefix(b"bearer "))?;
        let token = std::str::from_utf8(rest).ok()?;
        self.cached_token(token)
    }

    fn cached_token(&self, token: &str) -> Option<Result<Identity, JwtError>> {
        let hit = self.jwts.get(token)?;
        if hit.exp + jwt::LEEWAY_SECS <= now_ms() / 1000 {
            self.jwts.remove(token);
            return Some(Err(JwtError::Expired));
        }
        Some(self.still_valid(hit.identity))
    }

    async fn verify_bearer(&self, token: &str) -> Result<Identity, JwtError> {
        if !looks_like_jwt(token) {
            return Err(JwtError::Malformed);
        }
        if let Some(remembered) = self.cached_token(token) {
            return remembered;
        }
        let kid = jwt::key_id(token)?;
        let own = match (&self.keys, &kid) {
            (Some(keys), Some(kid)) => keys.key_set().contains(kid) || keys.refresh_for(kid).await,
            _ => false,
        };
        let identity = if own {
            let keys = self.keys.as_ref().map(|k| k.key_set()).unwrap_or_default();
            let claims = jwt::verify(token, &keys, &self.settings.issuer, &self.settings.service)?;
            Identity::Bearer(Arc::new(claims))
        } else if let Some(external) = &self.settings.external {
            let claims = jwt::verify(token, &external.keys, &external.issuer, &external.service)?;
            Identity::External(Arc::new(claims))
        } else {
            return Err(JwtError::UnknownKey);
        };
        let exp = match &identity {
            Identity::Bearer(c) | Identity::External(c) => c.exp,
            _ => 0,
        };
        self.jwts.insert(
            token.to_string(),
            CachedToken {
                identity: identity.clone(),
                exp,
            },
        );
        self.still_valid(identity)
    }

    /// A Berth token stands only while what it was issued to does: an API
    /// token not revoked (and not made again), an htpasswd user still in
    /// the file.
    fn still_valid(&self, identity: Identity) -> Result<Identity, JwtError> {
        let Identity::Bearer(claims) = &identity else {
            return Ok(identity);
        };
        let Some(berth) = &claims.berth else {
            return Ok(identity);
        };
        let standing = match berth.kind {
            PrincipalKind::Token => match (&self.tokens, &berth.tid) {
                (Some(tokens), Some(tid)) => tokens.live(&claims.sub, tid, now_ms()),
                _ => false,
            },
            PrincipalKind::User => self.htpasswd().is_some_and(|f| f.contains(&claims.sub)),
            PrincipalKind::Certificate | PrincipalKind::Anonymous => true,
        };
        if standing {
            Ok(identity)
        } else {
            Err(JwtError::Revoked)
        }
    }

    /// The claims a Berth token for `identity` starts from (who it is).
    pub(crate) fn subject_claims(
        &self,
        identity: &Identity,
    ) -> Option<(String, PrincipalKind, Option<String>)> {
        match identity {
            Identity::Anonymous => Some((String::new(), PrincipalKind::Anonymous, None)),
            Identity::User(u) => Some((u.clone(), PrincipalKind::User, None)),
            Identity::Certificate(c) => Some((c.clone(), PrincipalKind::Certificate, None)),
            Identity::ApiToken(t) => Some((
                t.name().to_string(),
                PrincipalKind::Token,
                Some(t.record.id.clone()),
            )),
            // Peers read feeds with their secret; external tokens are the
            // external server's business; a token is not re-issued.
            Identity::Peer(_) | Identity::Bearer(_) | Identity::External(_) => None,
        }
    }

    pub(crate) fn claims_template(&self) -> (&str, &str, Duration) {
        (
            &self.settings.issuer,
            &self.settings.service,
            self.settings.token_ttl,
        )
    }

    /// The current signing key, if this region issues tokens.
    pub(crate) fn signing_key(&self) -> Option<crate::keys::SigningKey> {
        self.keys.as_ref()?.signing_key(now_ms())
    }

    /// For tests and the token endpoint: the claims of a token string this
    /// node would accept.
    pub async fn verify_token(&self, token: &str) -> Result<Identity, JwtError> {
        self.verify_bearer(token).await
    }
}

impl Claims {
    pub fn is_berth_anonymous(&self) -> bool {
        self.berth.as_ref().map(|b| b.kind) == Some(PrincipalKind::Anonymous)
    }
}
