//! Repositories and pages of names.

use berth_oci::RepositoryName;

use super::{Page, Registry, Result};
use crate::keys;

impl Registry {
    /// Whether a repository exists here (anything was ever pushed or cached).
    pub async fn repository_exists(&self, name: &RepositoryName) -> Result<bool> {
        Ok(self.meta.get(keys::repo(name).as_bytes()).await?.is_some())
    }

    pub(super) async fn page(
        &self,
        prefix: &str,
        last: Option<&str>,
        n: Option<usize>,
    ) -> Result<Page> {
        let n = n.unwrap_or(self.limits.max_page).min(self.limits.max_page);
        if n == 0 {
            return Ok(Page {
                items: Vec::new(),
                more: false,
            });
        }
        let after = last.map(|l| format!("{prefix}{l}"));
        let batch = self
            .meta
            .scan(
                prefix.as_bytes(),
                after.as_deref().map(str::as_bytes),
                n + 1,
            )
            .await?;
        let more = batch.len() > n;
        let items = batch
            .into_iter()
            .take(n)
            .map(|kv| String::from_utf8_lossy(&kv.key[prefix.len()..]).into_owned())
            .collect();
        Ok(Page { items, more })
    }

    pub async fn catalog(&self, last: Option<&str>, n: Option<usize>) -> Result<Page> {
        self.page(keys::REPO_PREFIX, last, n).await
    }
}
