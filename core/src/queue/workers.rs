//! The worker registry and consumer clean-up.

use super::*;

impl Queue {
    /// Registers or refreshes a worker's registry entry (expires after `worker_ttl` without a
    /// heartbeat).
    pub async fn heartbeat_worker(&self, info: &WorkerInfo) -> Result<()> {
        let mut c = self.conn.clone();
        let mut info = info.clone();
        info.last_heartbeat_ms = now_ms();
        let json = serde_json::to_string(&info).map_err(|e| CoreError::corrupt("worker", e))?;
        let mut pipe = redis::pipe();
        pipe.cmd("SET")
            .arg(worker_key(&info.id))
            .arg(json)
            .arg("PX")
            .arg(self.config.worker_ttl.as_millis() as u64)
            .ignore();
        pipe.sadd(WORKERS_KEY, &info.id).ignore();
        let _: () = pipe.query_async(&mut c).await?;
        Ok(())
    }

    /// Same as [`Queue::heartbeat_worker`]; named for readability at start-up.
    pub async fn register_worker(&self, info: &WorkerInfo) -> Result<()> {
        self.heartbeat_worker(info).await
    }

    /// Removes a worker's registry entry (clean shutdown).
    pub async fn deregister_worker(&self, id: &str) -> Result<()> {
        let mut c = self.conn.clone();
        let mut pipe = redis::pipe();
        pipe.del(worker_key(id))
            .ignore()
            .srem(WORKERS_KEY, id)
            .ignore();
        let _: () = pipe.query_async(&mut c).await?;
        Ok(())
    }

    /// Removes `worker`'s consumer from the lanes' groups after a clean drain, so restarts with new
    /// ids do not pile up consumers. Lanes where it still holds pending entries are left alone
    /// (those entries must stay claimable).
    pub async fn remove_consumer(&self, worker: &str, lanes: &[Lane]) -> Result<()> {
        let mut c = self.conn.clone();
        for lane in lanes {
            let pending: Vec<Value> = redis::cmd("XPENDING")
                .arg(lane.key())
                .arg(GROUP)
                .arg("-")
                .arg("+")
                .arg(1)
                .arg(worker)
                .query_async(&mut c)
                .await?;
            if pending.is_empty() {
                let _: i64 = redis::cmd("XGROUP")
                    .arg("DELCONSUMER")
                    .arg(lane.key())
                    .arg(GROUP)
                    .arg(worker)
                    .query_async(&mut c)
                    .await?;
            }
        }
        Ok(())
    }
}
