//! The whole path of a credential through this crate: authentication,
//! the decision for each kind of requirement, tokens issued and verified,
//! revocation, reload, peers, and the open registry.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use berth_store::MetaStore;

use crate::header::basic_header;
use crate::jwt::{self, Access, BerthClaims, Claims, JwtError, PrincipalKind};
use crate::*;

// `htpasswd -nbB -C 4 alice wonderland` and `... root toor`.
const ALICE: &str = "alice:$2y$04$SzXCZYtB4okVntpyoPDqqemm6h6bp5SUY4BrMD4t6tzp0JwEbGY2y";

fn meta() -> Arc<dyn MetaStore> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("meta.redb");
    std::mem::forget(dir);
    Arc::new(berth_store::RedbMetaStore::open(&path).unwrap())
}

fn rule(repos: &[&str], users: &[&str], actions: &[&str]) -> AccessRule {
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect();
    AccessRule {
        repositories: s(repos),
        users: s(users),
        groups: Vec::new(),
        actions: s(actions),
    }
}

fn settings(enabled: bool) -> AuthSettings {
    AuthSettings {
        enabled,
        policy: Policy::new(
            &[
                rule(&["team/*"], &["alice"], &["pull", "push"]),
                rule(&["public/**"], &["anonymous"], &["pull"]),
                rule(&["**"], &["bob"], &["admin"]),
            ],
            &HashMap::new(),
        )
        .unwrap(),
        token_service: true,
        issuer: "berth".into(),
        service: "registry".into(),
        token_ttl: Duration::from_secs(300),
        external: None,
        peers: vec![PeerCredential {
            name: "us".into(),
            secret: Some("peer-secret".into()),
            certificate: Some("us.example".into()),
        }],
        credential_ttl: Duration::from_secs(30),
    }
}

async fn authenticator(enabled: bool) -> (Authenticator, Arc<dyn MetaStore>) {
    let meta = meta();
    let keys = Arc::new(KeyStore::open(meta.clone(), now_ms()).await.unwrap());
    let tokens = Arc::new(ApiTokens::new(meta.clone()));
    let bob = bcrypt::hash_with_result("builder", 4)
        .unwrap()
        .format_for_version(bcrypt::Version::TwoY);
    let file = Htpasswd::parse(&format!("{ALICE}\nbob:{bob}\n")).unwrap();
    (
        Authenticator::new(settings(enabled), Some(file), Some(keys), Some(tokens)),
        meta,
    )
}

const CLIENT: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);

async fn auth(a: &Authenticator, header: Option<&str>) -> Result<Identity, AuthFailure> {
    a.authenticate(&AuthRequest {
        authorization: header.map(str::as_bytes),
        certificate: None,
        client: CLIENT,
    })
    .await
}

fn repo(name: &str, action: Action) -> Requirement {
    Requirement::Repositories(vec![(name.to_string(), action)])
}

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

fn scopes(list: &[&str]) -> Vec<Scope> {
    parse_scopes(list.iter().copied()).unwrap()
}

#[tokio::test]
async fn basic_users_and_the_policy() {
    let (a, _) = authenticator(true).await;
    let anonymous = auth(&a, None).await.unwrap();
    assert!(anonymous.is_anonymous());
    let alice = auth(&a, Some(&basic_header("alice", "wonderland")))
        .await
        .unwrap();
    assert!(matches!(&alice, Identity::User(u) if u == "alice"));
    // The second time from the cache, same answer.
    assert!(
        auth(&a, Some(&basic_header("alice", "wonderland")))
            .await
            .is_ok()
    );
    assert!(matches!(
        auth(&a, Some(&basic_header("alice", "wrong"))).await,
        Err(AuthFailure::BadCredentials { .. })
    ));
    assert!(matches!(
        auth(&a, Some("Digest x")).await,
        Err(AuthFailure::Malformed(_))
    ));

    assert_eq!(
        a.authorize(&alice, &repo("team/app", Action::Push)),
        Decision::Allow
    );
    assert_eq!(
        a.authorize(&alice, &repo("team/a/b", Action::Pull)),
        Decision::Deny
    );
    assert_eq!(
        a.authorize(&alice, &repo("team/app", Action::Delete)),
        Decision::Deny
    );
    assert_eq!(
        a.authorize(&alice, &repo("public/x", Action::Pull)),
        Decision::Allow
    );
    assert_eq!(a.authorize(&alice, &Requirement::Admin), Decision::Deny);
    assert_eq!(a.authorize(&alice, &Requirement::SignedIn), Decision::Allow);
    assert_eq!(a.authorize(&alice, &Requirement::Feed), Decision::Deny);
    assert_eq!(
        a.authorize(&anonymous, &repo("team/app", Action::Pull)),
        Decision::Challenge {
            scope: Some("repository:team/app:pull".into()),
            insufficient: false
        }
    );
    assert_eq!(
        a.authorize(&anonymous, &repo("public/x", Action::Pull)),
        Decision::Allow
    );
    assert!(matches!(
        a.authorize(&anonymous, &Requirement::SignedIn),
        Decision::Challenge { .. }
    ));
    assert!(matches!(
        a.authorize(&anonymous, &Requirement::Admin),
        Decision::Challenge { .. }
    ));
    let bob = auth(&a, Some(&basic_header("bob", "builder")))
        .await
        .unwrap();
    assert_eq!(a.authorize(&bob, &Requirement::Admin), Decision::Allow);
    assert_eq!(
        a.authorize(&bob, &Requirement::RegionControl),
        Decision::Allow
    );
    assert_eq!(a.authorize(&bob, &Requirement::Feed), Decision::Allow);
    assert_eq!(
        a.authorize(&bob, &repo("any/thing", Action::Delete)),
        Decision::Allow
    );
    assert!(a.may_list(&alice, "team/app"));
    assert!(!a.may_list(&alice, "other"));
}

#[tokio::test]
async fn failed_sign_ins_are_throttled() {
    let (a, _) = authenticator(true).await;
    for i in 0..throttle::BURST as usize {
        assert!(matches!(
            auth(&a, Some(&basic_header("alice", &format!("guess-{i}")))).await,
            Err(AuthFailure::BadCredentials { .. })
        ));
    }
    // A client repeating the same wrong password is refused from memory
    // and does not count again: it is no new guess.
    for _ in 0..20 {
        assert!(matches!(
            auth(&a, Some(&basic_header("alice", "guess-0"))).await,
            Err(AuthFailure::BadCredentials { .. })
        ));
    }
    // Now even the right password waits, from this address.
    assert!(matches!(
        auth(&a, Some(&basic_header("alice", "wonderland"))).await,
        Err(AuthFailure::Throttled { .. })
    ));
    // From another address alice signs in; so does bob from this one.
    for (who, password, client) in [
        ("alice", "wonderland", "10.0.0.7"),
        ("bob", "builder", "127.0.0.1"),
    ] {
        let header = basic_header(who, password);
        let signed_in = a
            .authenticate(&AuthRequest {
                authorization: Some(header.as_bytes()),
                certificate: None,
                client: client.parse().unwrap(),
            })
            .await;
        assert!(signed_in.is_ok(), "{who} from {client}");
    }
    // Once verified, alice's credential passes even from the throttled
    // address: a guesser does not stop her running clients.
    assert!(
        auth(&a, Some(&basic_header("alice", "wonderland")))
            .await
            .is_ok()
    );
}

/// Sixteen sign-ins as alice sent at once, as a client opening sixteen
/// connections does.
async fn at_once(
    a: &Arc<Authenticator>,
    password: &'static str,
) -> Vec<Result<Identity, AuthFailure>> {
    let tasks: Vec<_> = (0..16)
        .map(|_| {
            let a = a.clone();
            tokio::spawn(async move { auth(&a, Some(&basic_header("carol", password))).await })
        })
        .collect();
    let mut results = Vec::new();
    for t in tasks {
        results.push(t.await.unwrap());
    }
    results
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_credential_sent_at_once_is_checked_once() {
    // carol's hash costs tens of milliseconds, so all sixteen arrive while
    // the first is checked.
    let carol = bcrypt::hash_with_result("in-the-sky", 10)
        .unwrap()
        .format_for_version(bcrypt::Version::TwoY);
    let line = format!("carol:{carol}\n");
    let with_carol = || async {
        let (a, _) = authenticator(true).await;
        a.set_htpasswd(Htpasswd::parse(&line).unwrap());
        Arc::new(a)
    };
    // More at once than the failures a pair may make, with the right
    // password: all sign in.
    let a = with_carol().await;
    for result in at_once(&a, "in-the-sky").await {
        assert!(result.is_ok());
    }
    // With one wrong password: every one is refused as wrong, none
    // throttled, and together they count as one guess.
    let a = with_carol().await;
    for result in at_once(&a, "wrong").await {
        assert!(matches!(result, Err(AuthFailure::BadCredentials { .. })));
    }
    for i in 1..throttle::BURST as usize {
        assert!(matches!(
            auth(&a, Some(&basic_header("carol", &format!("guess-{i}")))).await,
            Err(AuthFailure::BadCredentials { .. })
        ));
    }
}

#[tokio::test]
async fn tokens_carry_only_what_is_granted() {
    let (a, _) = authenticator(true).await;
    let alice = auth(&a, Some(&basic_header("alice", "wonderland")))
        .await
        .unwrap();
    let issued = a
        .issue(
            &alice,
            &scopes(&[
                "repository:team/app:pull",
                "repository:team/app:pull,push,delete",
                "repository:other/x:pull",
                "repository:public/p:pull,push",
            ]),
        )
        .unwrap();
    // Merged per repository; denied actions dropped, not refused.
    assert_eq!(
        issued.access,
        vec![
            Access::repository("team/app", Actions::of(&[Action::Pull, Action::Push])),
            Access::repository("other/x", Actions::NONE),
            Access::repository("public/p", Actions::of(&[Action::Pull])),
        ]
    );
    let with_token = auth(&a, Some(&bearer(&issued.token))).await.unwrap();
    assert!(matches!(with_token, Identity::Bearer(_)));
    assert_eq!(
        a.authorize(&with_token, &repo("team/app", Action::Push)),
        Decision::Allow
    );
    // Not in the token but the user may: fetch another token.
    assert_eq!(
        a.authorize(&with_token, &repo("team/other", Action::Push)),
        Decision::Challenge {
            scope: Some("repository:team/other:pull,push".into()),
            insufficient: true
        }
    );
    // Not in the token and not allowed: denied.
    assert_eq!(
        a.authorize(&with_token, &repo("other/x", Action::Pull)),
        Decision::Deny
    );
    // Public content needs no scope.
    assert_eq!(
        a.authorize(&with_token, &repo("public/q", Action::Pull)),
        Decision::Allow
    );
    // An anonymous token.
    let anon = a
        .issue(&Identity::Anonymous, &scopes(&["repository:team/app:pull"]))
        .unwrap();
    assert_eq!(
        anon.access,
        vec![Access::repository("team/app", Actions::NONE)]
    );
    let anon = auth(&a, Some(&bearer(&anon.token))).await.unwrap();
    assert!(anon.is_anonymous());
    assert!(matches!(
        a.authorize(&anon, &repo("team/app", Action::Pull)),
        Decision::Challenge {
            insufficient: false,
            ..
        }
    ));
    assert!(matches!(
        a.authorize(&anon, &Requirement::SignedIn),
        Decision::Challenge { .. }
    ));
    // A token with no access at all still signs in (docker login).
    let empty = a.issue(&alice, &[]).unwrap();
    let empty = auth(&a, Some(&bearer(&empty.token))).await.unwrap();
    assert_eq!(a.authorize(&empty, &Requirement::SignedIn), Decision::Allow);
}

#[tokio::test]
async fn forged_expired_and_foreign_tokens_are_refused() {
    let (a, _) = authenticator(true).await;
    let signing = a.keys().unwrap().signing_key(now_ms()).unwrap();
    let now = now_ms() / 1000;
    let claims = |exp: u64, iss: &str, aud: &str| Claims {
        iss: iss.into(),
        sub: "alice".into(),
        aud: aud.into(),
        exp,
        nbf: now - 10,
        iat: now - 10,
        jti: "x".into(),
        access: vec![Access::repository("team/app", Actions::of(&[Action::Pull]))],
        berth: Some(BerthClaims {
            kind: PrincipalKind::User,
            tid: None,
        }),
        grants: Vec::new(),
    };
    let expired = jwt::sign(&signing, &claims(now - 120, "berth", "registry")).unwrap();
    assert!(matches!(
        auth(&a, Some(&bearer(&expired))).await,
        Err(AuthFailure::InvalidToken(JwtError::Expired))
    ));
    let wrong_audience = jwt::sign(&signing, &claims(now + 60, "berth", "other")).unwrap();
    assert!(matches!(
        auth(&a, Some(&bearer(&wrong_audience))).await,
        Err(AuthFailure::InvalidToken(JwtError::WrongAudience))
    ));
    let stranger = SigningKey::generate().unwrap();
    let foreign = jwt::sign(&stranger, &claims(now + 60, "berth", "registry")).unwrap();
    assert!(matches!(
        auth(&a, Some(&bearer(&foreign))).await,
        Err(AuthFailure::InvalidToken(JwtError::UnknownKey))
    ));
    assert!(matches!(
        auth(&a, Some("Bearer not-a-jwt")).await,
        Err(AuthFailure::InvalidToken(JwtError::Malformed))
    ));
}

#[tokio::test]
async fn api_tokens_and_their_revocation() {
    let (a, meta) = authenticator(true).await;
    let tokens = a.api_tokens().unwrap().clone();
    let (record, secret) = tokens
        .create(
            NewToken {
                name: "ci".into(),
                repositories: vec!["team/**".into()],
                actions: Actions::of(&[Action::Pull, Action::Push]),
                expires_ms: None,
                created_by: "bob".into(),
            },
            now_ms(),
        )
        .await
        .unwrap();
    // Any user name goes with the secret.
    let ci = auth(&a, Some(&basic_header("whatever", &secret)))
        .await
        .unwrap();
    assert!(matches!(&ci, Identity::ApiToken(t) if t.name() == "ci"));
    assert_eq!(
        a.authorize(&ci, &repo("team/a/b", Action::Push)),
        Decision::Allow
    );
    assert_eq!(
        a.authorize(&ci, &repo("team/a/b", Action::Delete)),
        Decision::Deny
    );
    assert_eq!(a.authorize(&ci, &Requirement::Admin), Decision::Deny);
    // Its JWT stands as long as the token does.
    let issued = a.issue(&ci, &scopes(&["repository:team/x:push"])).unwrap();
    let header = bearer(&issued.token);
    assert!(auth(&a, Some(&header)).await.is_ok());
    // Revoked through another node's store handle: this node learns it at
    // its next refresh.
    ApiTokens::new(meta.clone()).revoke("ci").await.unwrap();
    tokens.refresh().await.unwrap();
    assert!(matches!(
        auth(&a, Some(&header)).await,
        Err(AuthFailure::InvalidToken(JwtError::Revoked))
    ));
    assert!(matches!(
        auth(&a, Some(&basic_header("whatever", &secret))).await,
        Err(AuthFailure::BadCredentials { .. })
    ));
    let _ = record;
}

#[tokio::test]
async fn htpasswd_reload_takes_effect_for_passwords_and_tokens() {
    let (a, _) = authenticator(true).await;
    let alice = auth(&a, Some(&basic_header("alice", "wonderland")))
        .await
        .unwrap();
    let token = a
        .issue(&alice, &scopes(&["repository:team/app:pull"]))
        .unwrap();
    let header = bearer(&token.token);
    assert!(auth(&a, Some(&header)).await.is_ok());
    // Alice removed from the file.
    a.set_htpasswd(Htpasswd::parse("").unwrap());
    assert!(matches!(
        auth(&a, Some(&basic_header("alice", "wonderland"))).await,
        Err(AuthFailure::BadCredentials { .. })
    ));
    assert!(matches!(
        auth(&a, Some(&header)).await,
        Err(AuthFailure::InvalidToken(JwtError::Revoked))
    ));
}

#[tokio::test]
async fn peers_read_feeds_and_nothing_else() {
    let (a, _) = authenticator(true).await;
    let peer = auth(&a, Some("Bearer peer-secret")).await.unwrap();
    assert!(matches!(&peer, Identity::Peer(p) if p == "us"));
    assert_eq!(a.authorize(&peer, &Requirement::Feed), Decision::Allow);
    assert_eq!(
        a.authorize(&peer, &repo("team/app", Action::Pull)),
        Decision::Allow
    );
    assert_eq!(
        a.authorize(&peer, &repo("team/app", Action::Push)),
        Decision::Deny
    );
    assert_eq!(
        a.authorize(&peer, &Requirement::RegionControl),
        Decision::Deny
    );
    assert_eq!(a.authorize(&peer, &Requirement::Admin), Decision::Deny);
    assert!(a.issue(&peer, &[]).is_err());
    // By its client certificate.
    let by_cert = a
        .authenticate(&AuthRequest {
            authorization: None,
            certificate: Some("us.example"),
            client: CLIENT,
        })
        .await
        .unwrap();
    assert!(matches!(by_cert, Identity::Peer(_)));
    // Another certificate is a user named by its subject.
    let user = a
        .authenticate(&AuthRequest {
            authorization: None,
            certificate: Some("alice"),
            client: CLIENT,
        })
        .await
        .unwrap();
    assert!(matches!(&user, Identity::Certificate(c) if c == "alice"));
    assert_eq!(
        a.authorize(&user, &repo("team/app", Action::Push)),
        Decision::Allow
    );
    // A wrong secret is an invalid token.
    assert!(auth(&a, Some("Bearer peer-secreT")).await.is_err());
}

#[tokio::test]
async fn an_open_registry_checks_only_peers() {
    let (a, _) = authenticator(false).await;
    let anyone = auth(&a, Some(&basic_header("x", "y"))).await.unwrap();
    assert!(anyone.is_anonymous());
    assert!(auth(&a, Some("Bearer junk")).await.unwrap().is_anonymous());
    assert_eq!(
        a.authorize(&anyone, &repo("team/app", Action::Delete)),
        Decision::Allow
    );
    assert_eq!(a.authorize(&anyone, &Requirement::Admin), Decision::Allow);
    assert!(matches!(
        a.authorize(&anyone, &Requirement::Feed),
        Decision::Challenge { .. }
    ));
    assert!(matches!(
        a.authorize(&anyone, &Requirement::RegionControl),
        Decision::Challenge { .. }
    ));
    let peer = auth(&a, Some("Bearer peer-secret")).await.unwrap();
    assert_eq!(a.authorize(&peer, &Requirement::Feed), Decision::Allow);
    assert_eq!(
        a.authorize(&peer, &Requirement::RegionControl),
        Decision::Allow
    );
}

#[test]
fn a_shared_peer_secret_names_every_peer_that_holds_it() {
    let mut s = settings(true);
    s.peers = vec![
        PeerCredential {
            name: "us".into(),
            secret: Some("shared".into()),
            certificate: None,
        },
        PeerCredential {
            name: "ap".into(),
            secret: Some("shared".into()),
            certificate: None,
        },
        PeerCredential {
            name: "sa".into(),
            secret: Some("its-own".into()),
            certificate: Some("sa.example".into()),
        },
    ];
    let a = Authenticator::new(s, None, None, None);
    assert!(a.peer_credential_shared("us", "ap"));
    assert!(a.peer_credential_shared("us", "us"));
    assert!(!a.peer_credential_shared("us", "sa"));
    assert!(!a.peer_credential_shared("sa", "us"));
    assert!(!a.peer_credential_shared("us", "nowhere"));
}
