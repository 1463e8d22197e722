//! Behaviour every storage engine must have. Each engine's tests call these
//! functions on a fresh, empty store; a failed expectation panics.

use berth_oci::{ByteRange, Digest};
use bytes::Bytes;
use futures_util::StreamExt;

use crate::{BlobStore, ByteStream, MetaStore, PutError, Txn};

fn stream_of(chunks: Vec<Vec<u8>>) -> ByteStream {
    Box::pin(futures_util::stream::iter(
        chunks.into_iter().map(|c| Ok(Bytes::from(c))),
    ))
}

fn failing_stream(first: Vec<u8>) -> ByteStream {
    Box::pin(futures_util::stream::iter(vec![
        Ok(Bytes::from(first)),
        Err(std::io::Error::new(
            std::io::ErrorKind::BrokenPipe,
            "client went away",
        )),
    ]))
}

async fn collect(stream: ByteStream) -> Result<Vec<u8>, std::io::Error> {
    let mut out = Vec::new();
    let mut stream = stream;
    while let Some(chunk) = stream.next().await {
        out.extend_from_slice(&chunk?);
    }
    Ok(out)
}

pub async fn metastore_suite(store: &dyn MetaStore) {
    assert!(store.get(b"missing").await.unwrap().is_none());
    store.check_health().await.unwrap();

    // Create-if-absent succeeds once.
    assert!(
        store
            .commit(Txn::new().require_absent("a/1").put("a/1", "x"))
            .await
            .unwrap()
    );
    assert!(
        !store
            .commit(Txn::new().require_absent("a/1").put("a/1", "y"))
            .await
            .unwrap()
    );
    let kv = store.get(b"a/1").await.unwrap().unwrap();
    assert_eq!(kv.value, b"x");

    // Batched reads answer in order, as single ones would.
    let keys: Vec<Vec<u8>> = (0..150)
        .map(|i| {
            if i % 2 == 0 {
                b"a/1".to_vec()
            } else {
                format!("none/{i}").into_bytes()
            }
        })
        .collect();
    let many = store.get_many(&keys).await.unwrap();
    assert_eq!(many.len(), 150);
    assert_eq!(many[0].as_ref(), Some(&kv));
    assert!(many[1].is_none() && many[148].as_ref() == Some(&kv));
    assert!(store.get_many(&[]).await.unwrap().is_empty());

    // Compare-and-swap on the version.
    assert!(
        store
            .commit(
                Txn::new()
                    .require_version("a/1", kv.version)
                    .put("a/1", "z")
            )
            .await
            .unwrap()
    );
    assert!(
        !store
            .commit(
                Txn::new()
                    .require_version("a/1", kv.version)
                    .put("a/1", "w")
            )
            .await
            .unwrap()
    );
    let kv2 = store.get(b"a/1").await.unwrap().unwrap();
    assert_eq!(kv2.value, b"z");
    assert_ne!(kv2.version, kv.version);

    // A failed comparison writes nothing, even to other keys.
    assert!(
        !store
            .commit(Txn::new().require_absent("a/1").put("a/2", "nope"))
            .await
            .unwrap()
    );
    assert!(store.get(b"a/2").await.unwrap().is_none());

    // Multi-key atomic writes and prefix scans in byte order, with paging.
    let mut txn = Txn::new();
    for k in ["p/c", "p/a", "p/b", "p/d", "q/a", "o/z"] {
        txn = txn.put(k, k);
    }
    assert!(store.commit(txn).await.unwrap());
    let keys = |kvs: Vec<crate::KeyValue>| {
        kvs.into_iter()
            .map(|kv| String::from_utf8(kv.key).unwrap())
            .collect::<Vec<_>>()
    };
    assert_eq!(
        keys(store.scan(b"p/", None, 100).await.unwrap()),
        ["p/a", "p/b", "p/c", "p/d"]
    );
    assert_eq!(
        keys(store.scan(b"p/", None, 2).await.unwrap()),
        ["p/a", "p/b"]
    );
    assert_eq!(
        keys(store.scan(b"p/", Some(b"p/b"), 100).await.unwrap()),
        ["p/c", "p/d"]
    );
    assert_eq!(
        keys(store.scan(b"p/", Some(b"p/bb"), 1).await.unwrap()),
        ["p/c"]
    );
    assert!(
        store
            .scan(b"p/", Some(b"p/d"), 10)
            .await
            .unwrap()
            .is_empty()
    );
    assert!(store.scan(b"p/", Some(b"z"), 10).await.unwrap().is_empty());
    assert_eq!(
        keys(store.scan(b"p/", Some(b"a"), 1).await.unwrap()),
        ["p/a"]
    );
    assert!(store.scan(b"nothing/", None, 10).await.unwrap().is_empty());

    // Deletes, including under a guard.
    let d = store.get(b"p/d").await.unwrap().unwrap();
    assert!(
        store
            .commit(
                Txn::new()
                    .require_version("p/d", d.version)
                    .delete("p/d")
                    .delete("p/c")
            )
            .await
            .unwrap()
    );
    assert_eq!(
        keys(store.scan(b"p/", None, 100).await.unwrap()),
        ["p/a", "p/b"]
    );
    assert!(
        !store
            .commit(Txn::new().require_version("p/d", d.version))
            .await
            .unwrap()
    );

    // A snapshot sees the store as it was when taken, page by page, while
    // commits change and delete what it holds.
    let before = keys(store.scan(b"p/", None, 100).await.unwrap());
    let snapshot = store.snapshot().await.unwrap();
    let revision = snapshot.revision();
    let b = store.get(b"p/b").await.unwrap().unwrap();
    assert!(
        store
            .commit(
                Txn::new()
                    .delete("p/a")
                    .put("p/b", "changed")
                    .put("p/z", "new")
            )
            .await
            .unwrap()
    );
    let first = snapshot.scan(b"p/", None, 1).await.unwrap();
    let rest = snapshot
        .scan(b"p/", Some(&first[0].key), 100)
        .await
        .unwrap();
    let seen: Vec<crate::KeyValue> = first.into_iter().chain(rest).collect();
    assert_eq!(keys(seen.clone()), before);
    let b_then = seen.iter().find(|kv| kv.key == b"p/b").unwrap();
    assert_eq!(b_then.value, b.value);
    assert_eq!(b_then.version, b.version);
    assert_eq!(
        keys(store.scan(b"p/", None, 100).await.unwrap()),
        ["p/b", "p/z"]
    );
    assert!(store.snapshot().await.unwrap().revision() > revision);
    drop(snapshot);
    assert!(
        store
            .commit(Txn::new().put("p/a", "x").put("p/b", "x").delete("p/z"))
            .await
            .unwrap()
    );

    // Binary keys and values.
    assert!(
        store
            .commit(Txn::new().put(vec![0u8, 255, 1], vec![0u8; 3]))
            .await
            .unwrap()
    );
    assert_eq!(
        store.get(&[0, 255, 1]).await.unwrap().unwrap().value,
        vec![0u8; 3]
    );

    // Concurrent create-if-absent: exactly one wins.
    let attempts = (0..16).map(|i| {
        store.commit(
            Txn::new()
                .require_absent("race")
                .put("race", format!("{i}")),
        )
    });
    let results = futures_util::future::join_all(attempts).await;
    assert_eq!(
        results.into_iter().filter(|r| *r.as_ref().unwrap()).count(),
        1
    );

    lease_suite(store).await;
}

/// Leases: leased keys live while the lease is kept alive and vanish when it
/// is revoked or lapses; leadership is a create-if-absent on a leased key.
async fn lease_suite(store: &dyn MetaStore) {
    let ttl = std::time::Duration::from_secs(2);
    let lease = store.grant_lease(ttl).await.unwrap();
    let leader = Txn::new()
        .require_absent("leader/job")
        .put_leased("leader/job", "node-a", lease);
    assert!(store.commit(leader).await.unwrap());
    let rival = store.grant_lease(ttl).await.unwrap();
    assert!(
        !store
            .commit(Txn::new().require_absent("leader/job").put_leased(
                "leader/job",
                "node-b",
                rival
            ))
            .await
            .unwrap(),
        "a held leadership cannot be taken"
    );
    assert!(store.keep_lease_alive(lease).await.unwrap());
    store.revoke_lease(lease).await.unwrap();
    assert!(store.get(b"leader/job").await.unwrap().is_none());
    assert!(!store.keep_lease_alive(lease).await.unwrap());
    // The rival takes over; left alone, its lease lapses and the key goes.
    assert!(
        store
            .commit(Txn::new().require_absent("leader/job").put_leased(
                "leader/job",
                "node-b",
                rival
            ))
            .await
            .unwrap()
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        // Asking about the lease is what lets the embedded engine notice.
        let alive = store.keep_lease_alive(rival.wrapping_add(7)).await.unwrap();
        assert!(!alive, "an unknown lease is not alive");
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        if store.get(b"leader/job").await.unwrap().is_none() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "a lapsed lease must release its keys"
        );
    }
    assert!(!store.keep_lease_alive(rival).await.unwrap());
}

pub async fn blobstore_suite(store: &dyn BlobStore) {
    store.check_health().await.unwrap();
    let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    let digest = Digest::sha256_of(&data);
    assert!(store.stat(&digest).await.unwrap().is_none());
    assert!(store.read(&digest, None).await.unwrap().is_none());

    // A wrong digest stores nothing.
    let wrong = Digest::sha256_of(b"other");
    let err = store
        .put(&wrong, stream_of(vec![data.clone()]), u64::MAX)
        .await
        .unwrap_err();
    assert!(matches!(err, PutError::DigestMismatch { .. }), "{err:?}");
    assert!(store.stat(&wrong).await.unwrap().is_none());

    // Over the limit stores nothing.
    let err = store
        .put(&digest, stream_of(vec![data.clone()]), 1000)
        .await
        .unwrap_err();
    assert!(matches!(err, PutError::TooLarge { .. }), "{err:?}");
    assert!(store.stat(&digest).await.unwrap().is_none());

    // A body that fails midway stores nothing.
    let err = store
        .put(&digest, failing_stream(data[..1000].to_vec()), u64::MAX)
        .await
        .unwrap_err();
    assert!(matches!(err, PutError::Body(_)), "{err:?}");
    assert!(store.stat(&digest).await.unwrap().is_none());

    // A good put, in uneven chunks; idempotent.
    let chunks = vec![
        data[..1].to_vec(),
        data[1..700_001].to_vec(),
        data[700_001..].to_vec(),
    ];
    assert_eq!(
        store
            .put(&digest, stream_of(chunks.clone()), u64::MAX)
            .await
            .unwrap(),
        data.len() as u64
    );
    assert_eq!(
        store
            .put(&digest, stream_of(chunks), u64::MAX)
            .await
            .unwrap(),
        data.len() as u64
    );
    assert_eq!(store.stat(&digest).await.unwrap(), Some(data.len() as u64));

    // Whole and ranged reads.
    let read = store.read(&digest, None).await.unwrap().unwrap();
    assert_eq!(read.size, data.len() as u64);
    assert_eq!(collect(read.stream).await.unwrap(), data);
    let range = ByteRange {
        start: 262_100,
        end: 600_000,
    };
    let read = store.read(&digest, Some(range)).await.unwrap().unwrap();
    assert_eq!(
        collect(read.stream).await.unwrap(),
        &data[262_100..=600_000]
    );
    assert_eq!(
        store.read_small(&digest, u64::MAX).await.unwrap().unwrap(),
        data
    );
    assert!(store.read_small(&digest, 10).await.is_err());

    // Uploads: parts hashed on the way, committed in the order given.
    store.delete(&digest).await.unwrap();
    let id = "2f1d0b8e-0000-4000-8000-000000000001";
    let first = store
        .write_part(id, None, stream_of(vec![data[..100].to_vec()]), u64::MAX)
        .await
        .unwrap();
    assert_eq!(first.size, 100);
    assert_eq!(first.sha256, Digest::sha256_of(&data[..100]));
    // A failed chunk, or one over its limit, leaves nothing.
    let err = store
        .write_part(id, None, failing_stream(data[100..5000].to_vec()), u64::MAX)
        .await
        .unwrap_err();
    assert!(matches!(err, PutError::Body(_)), "{err:?}");
    let err = store
        .write_part(id, None, stream_of(vec![data[100..].to_vec()]), 1000)
        .await
        .unwrap_err();
    assert!(matches!(err, PutError::TooLarge { .. }), "{err:?}");
    let rest = store
        .write_part(id, None, stream_of(vec![data[100..].to_vec()]), u64::MAX)
        .await
        .unwrap();
    assert_ne!(first.name, rest.name);
    let listed = store.list_uploads().await.unwrap();
    assert!(listed.iter().any(|u| u.id == id && u.modified_ms > 0));
    // The wrong order does not verify and installs nothing.
    let err = store
        .commit_parts(id, &[rest.clone(), first.clone()], &digest)
        .await
        .unwrap_err();
    assert!(matches!(err, PutError::DigestMismatch { .. }), "{err:?}");
    assert!(store.stat(&digest).await.unwrap().is_none());
    assert_eq!(
        store
            .commit_parts(id, &[first.clone(), rest.clone()], &digest)
            .await
            .unwrap(),
        data.len() as u64
    );
    let read = store.read(&digest, None).await.unwrap().unwrap();
    assert_eq!(collect(read.stream).await.unwrap(), data);
    // Parts stay until the upload is deleted; a deleted part is missing.
    store.delete_part(id, &first).await.unwrap();
    let err = store
        .commit_parts(id, &[first.clone(), rest.clone()], &digest)
        .await
        .unwrap_err();
    assert!(matches!(err, PutError::PartMissing(_)), "{err:?}");
    store.delete_upload(id).await.unwrap();
    store.delete_upload(id).await.unwrap();
    assert!(
        !store
            .list_uploads()
            .await
            .unwrap()
            .iter()
            .any(|u| u.id == id)
    );

    // One part whose own digest matches is installed without a re-read; a
    // second commit of the same content is harmless.
    let single = "2f1d0b8e-0000-4000-8000-000000000002";
    let whole = store
        .write_part(
            single,
            Some(5),
            stream_of(vec![b"exact".to_vec()]),
            u64::MAX,
        )
        .await
        .unwrap();
    let exact = Digest::sha256_of(b"exact");
    for _ in 0..2 {
        assert_eq!(
            store
                .commit_parts(single, std::slice::from_ref(&whole), &exact)
                .await
                .unwrap(),
            5
        );
    }
    // A part committed under another digest is read again, does not match
    // and installs nothing.
    let err = store
        .commit_parts(single, std::slice::from_ref(&whole), &wrong)
        .await
        .unwrap_err();
    assert!(matches!(err, PutError::DigestMismatch { .. }), "{err:?}");
    assert!(store.stat(&wrong).await.unwrap().is_none());
    store.delete_upload(single).await.unwrap();
    let read = store.read(&exact, None).await.unwrap().unwrap();
    assert_eq!(collect(read.stream).await.unwrap(), b"exact");
    store.delete(&exact).await.unwrap();
    let err = store
        .commit_parts(single, std::slice::from_ref(&whole), &exact)
        .await
        .unwrap_err();
    assert!(matches!(err, PutError::PartMissing(_)), "{err:?}");

    // Empty blobs are blobs too.
    let empty = Digest::sha256_of(b"");
    let id3 = "2f1d0b8e-0000-4000-8000-000000000003";
    assert_eq!(store.commit_parts(id3, &[], &empty).await.unwrap(), 0);
    assert_eq!(store.stat(&empty).await.unwrap(), Some(0));
    let read = store.read(&empty, None).await.unwrap().unwrap();
    assert!(collect(read.stream).await.unwrap().is_empty());

    // A chunk shorter or longer than announced leaves no trace.
    let id5 = "2f1d0b8e-0000-4000-8000-000000000005";
    for (announced, body) in [(10, b"short".to_vec()), (3, b"longer".to_vec())] {
        let err = store
            .write_part(id5, Some(announced), stream_of(vec![body]), u64::MAX)
            .await
            .unwrap_err();
        assert!(matches!(err, PutError::LengthMismatch { .. }), "{err:?}");
    }
    store.delete_upload(id5).await.unwrap();

    let listed = store.list().await.unwrap();
    let found = listed.iter().find(|b| b.digest == digest).unwrap();
    assert_eq!(found.size, data.len() as u64);
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let age_ms = now_ms.saturating_sub(found.modified_ms);
    assert!(age_ms < 10 * 60 * 1000, "modified {age_ms} ms ago");
    store.delete(&digest).await.unwrap();
    store.delete(&digest).await.unwrap();
    assert!(store.stat(&digest).await.unwrap().is_none());
    assert!(
        !store
            .list()
            .await
            .unwrap()
            .iter()
            .any(|b| b.digest == digest)
    );
}
