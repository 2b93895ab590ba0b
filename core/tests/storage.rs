//! Storage tests: a real S3 server (`s3s-fs`, which verifies SigV4 signatures, or the one CI names
//! in `PIXFARM_TEST_S3_ENDPOINT`) and the local file store.

use std::time::Duration;

use anyhow::Result;
use bytes::Bytes;
use pixfarm_core::testing::{S3Server, http_get};
use pixfarm_core::{CoreError, Storage, StorageOptions};

fn bucket(name: &str) -> String {
    format!(
        "pf-{name}-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    )
}

#[tokio::test]
async fn s3_put_get_presign_roundtrip() -> Result<()> {
    let s3 = S3Server::from_env_or_start().await?;
    let b = bucket("rt");
    let st = Storage::open_with(&format!("s3://{b}/base"), s3.storage_options()).await?;
    let data = Bytes::from((0..10_000u32).map(|i| (i * 7) as u8).collect::<Vec<_>>());
    st.put("jobs/x/000001.png", data.clone(), "image/png")
        .await?;
    assert_eq!(st.get("jobs/x/000001.png").await?, data);
    assert!(st.exists("jobs/x/000001.png").await?);
    assert!(!st.exists("jobs/x/000002.png").await?);
    assert!(matches!(
        st.get("jobs/x/000002.png").await,
        Err(CoreError::NotFound { .. })
    ));
    // The store prefix is part of the real key.
    assert_eq!(
        st.get_uri(&format!("s3://{b}/base/jobs/x/000001.png"))
            .await?,
        data
    );

    // The presigned URL works without credentials, and only as signed.
    let url = st.presign_get("jobs/x/000001.png").await?;
    assert!(url.contains("X-Amz-Signature="), "{url}");
    let (status, body) = http_get(&url).await?;
    assert_eq!(status, 200);
    assert_eq!(body, data.to_vec());
    let tampered = url.replace("000001.png", "000002.png");
    let (status, _) = http_get(&tampered).await?;
    assert_eq!(status, 403, "the server checks signatures");

    st.delete("jobs/x/000001.png").await?;
    assert!(!st.exists("jobs/x/000001.png").await?);
    Ok(())
}

#[tokio::test]
async fn s3_wrong_credentials_fail_fast_and_clearly() -> Result<()> {
    let s3 = S3Server::from_env_or_start().await?;
    let b = bucket("creds");
    Storage::open_with(&format!("s3://{b}"), s3.storage_options()).await?;
    let opts = StorageOptions {
        secret_access_key: Some("wrong".into()),
        create_bucket: false,
        ..s3.storage_options()
    };
    let st = Storage::open_with(&format!("s3://{b}"), opts).await?;
    let t = std::time::Instant::now();
    let err = st
        .put("k", Bytes::from_static(b"x"), "text/plain")
        .await
        .unwrap_err();
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "a permanent error is not retried for minutes"
    );
    assert!(
        err.to_string().contains("SignatureDoesNotMatch") || err.to_string().contains("403"),
        "{err}"
    );
    Ok(())
}

#[tokio::test]
async fn s3_outage_delays_but_does_not_drop_a_put() -> Result<()> {
    let mut s3 = S3Server::start().await?;
    let b = bucket("outage");
    let st = Storage::open_with(&format!("s3://{b}"), s3.storage_options()).await?;
    s3.stop();
    let put = {
        let st = st.clone();
        tokio::spawn(async move {
            st.put("during-outage.png", Bytes::from_static(b"png"), "image/png")
                .await
        })
    };
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(!put.is_finished(), "the put waits for the server");
    s3.start_again().await?;
    let t = std::time::Instant::now();
    tokio::time::timeout(Duration::from_secs(30), put).await???;
    eprintln!(
        "put completed {} ms after S3 came back",
        t.elapsed().as_millis()
    );
    assert_eq!(
        st.get("during-outage.png").await?,
        Bytes::from_static(b"png")
    );
    Ok(())
}

#[tokio::test]
async fn file_store_roundtrip_and_escapes() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let st = Storage::open(&format!("file://{}", dir.path().display())).await?;
    st.put("a/b/000000.png", Bytes::from_static(b"img"), "image/png")
        .await?;
    assert_eq!(std::fs::read(dir.path().join("a/b/000000.png"))?, b"img");
    assert_eq!(st.get("a/b/000000.png").await?, Bytes::from_static(b"img"));
    assert_eq!(
        st.presign_get("a/b/000000.png").await?,
        format!("file://{}/a/b/000000.png", dir.path().display())
    );
    // Overwrite is atomic and idempotent.
    st.put("a/b/000000.png", Bytes::from_static(b"img2"), "image/png")
        .await?;
    assert_eq!(st.get("a/b/000000.png").await?, Bytes::from_static(b"img2"));
    assert!(
        std::fs::read_dir(dir.path().join("a/b"))?.count() == 1,
        "no temp files left"
    );
    for bad in ["../x", "/etc/passwd", "a//b", "a/./b", ""] {
        assert!(
            st.put(bad, Bytes::from_static(b"x"), "x").await.is_err(),
            "{bad}"
        );
    }
    assert!(matches!(
        st.get("missing").await,
        Err(CoreError::NotFound { .. })
    ));
    assert!(st.get_uri("s3://bucket/key").await.is_err());
    st.delete("a/b/000000.png").await?;
    st.delete("a/b/000000.png").await?;
    assert!(!st.exists("a/b/000000.png").await?);
    Ok(())
}

/// The first stored copy of an image is never replaced (S3 `If-None-Match: *`, a hard link on a
/// file store): a second render of the same task finds it and records its bytes instead.
#[tokio::test]
async fn put_new_keeps_the_first_copy_on_s3_and_files() -> Result<()> {
    let s3 = S3Server::from_env_or_start().await?;
    let dir = tempfile::tempdir()?;
    let stores = [
        Storage::open_with(&format!("s3://{}/p", bucket("pn")), s3.storage_options()).await?,
        Storage::open(&format!("file://{}", dir.path().display())).await?,
    ];
    for st in stores {
        let first = Bytes::from_static(b"first render");
        let second = Bytes::from_static(b"second render, other bytes");
        assert_eq!(
            st.put_new("j/000000.png", first.clone(), "image/png")
                .await?,
            pixfarm_core::PutNew::Created,
            "{}",
            st.describe()
        );
        assert_eq!(
            st.put_new("j/000000.png", second, "image/png").await?,
            pixfarm_core::PutNew::Exists,
            "{}",
            st.describe()
        );
        assert_eq!(st.get("j/000000.png").await?, first, "{}", st.describe());
    }
    Ok(())
}
