//! The real Go server for the tests: `conformance/cmd/testoperator`, built
//! once per test binary (or taken from `OPF_TESTOPERATOR`), and an in-process
//! plugin serving the conformance service through the SDK.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use opf_conformance::Conformance;
use opf_conformance::pb::conformance_service_client::ConformanceServiceClient;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::{mpsc, oneshot};
use tonic::transport::{Channel, Endpoint};

pub type Client = ConformanceServiceClient<Channel>;

/// The repository root.
fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../..").canonicalize().unwrap()
}

/// The testoperator binary: `OPF_TESTOPERATOR`, or built from the tree.
pub fn testoperator() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    static BUILD: Mutex<()> = Mutex::new(());
    if let Some(p) = BIN.get() {
        return p.clone();
    }
    let _g = BUILD.lock().unwrap();
    BIN.get_or_init(|| {
        if let Some(p) = std::env::var_os("OPF_TESTOPERATOR").filter(|p| !p.is_empty()) {
            return PathBuf::from(p);
        }
        let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join("testoperator");
        let st = std::process::Command::new("go")
            .args(["build", "-o"])
            .arg(&out)
            .arg("./conformance/cmd/testoperator")
            .current_dir(root())
            .status()
            .expect("running `go build` for the testoperator (set OPF_TESTOPERATOR to a prebuilt one)");
        assert!(st.success(), "go build ./conformance/cmd/testoperator failed");
        out
    })
    .clone()
}

/// A scratch directory, removed on drop.
pub struct Dir(pub PathBuf);

impl Dir {
    pub fn new() -> Self {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let p = std::env::temp_dir().join(format!("opf-rs-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Self(p)
    }

    pub fn sock(&self, name: &str) -> String {
        format!("unix://{}", self.0.join(name).display())
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A running testoperator.
pub struct Operator {
    child: Child,
    pub listen: String,
    pub proxy: String,
    events: mpsc::UnboundedReceiver<String>,
}

impl Operator {
    /// Starts one listening for plugins on `listen` (a unix socket in `dir`
    /// by default) and proxying calls to the plugin `conformance`.
    pub async fn start(dir: &Dir, name: &str, listen: Option<&str>, extra: &[&str]) -> Self {
        let listen = listen.map(str::to_owned).unwrap_or_else(|| dir.sock(&format!("{name}.sock")));
        let proxy = dir.sock(&format!("{name}-proxy.sock"));
        let mut child = Command::new(testoperator())
            .arg("-listen")
            .arg(&listen)
            .arg("-proxy")
            .arg(&proxy)
            .arg("-plugin")
            .arg("conformance")
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .expect("start the testoperator");
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let (tx, mut events) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok(Some(l)) = lines.next_line().await {
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
        let ready = tokio::time::timeout(Duration::from_secs(20), events.recv()).await;
        let line = ready.expect("the testoperator got ready in time").expect("the testoperator printed ready");
        assert!(line.contains("\"ready\""), "first line: {line}");
        Self { child, listen, proxy, events }
    }

    /// Waits for the next registration event of the given type
    /// (`registered` or `unregistered`).
    pub async fn next(&mut self, event: &str, within: Duration) -> Option<String> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            match tokio::time::timeout_at(deadline, self.events.recv()).await {
                Ok(Some(l)) if l.contains(&format!("\"event\":\"{event}\"")) => return Some(l),
                Ok(Some(_)) => continue,
                _ => return None,
            }
        }
    }

    /// Counts the registration events that arrive within `within`.
    pub async fn count(&mut self, event: &str, within: Duration) -> usize {
        let mut n = 0;
        let deadline = tokio::time::Instant::now() + within;
        while let Ok(Some(l)) = tokio::time::timeout_at(deadline, self.events.recv()).await {
            if l.contains(&format!("\"event\":\"{event}\"")) {
                n += 1;
            }
        }
        n
    }

    /// A client of the proxy: calls reach the plugin through the tunnel.
    pub async fn client(&self) -> Client {
        ConformanceServiceClient::new(unix_channel(&self.proxy).await)
            .max_decoding_message_size(usize::MAX)
            .max_encoding_message_size(usize::MAX)
    }

    /// SIGTERM: the server drains (GoAway to the plugins) and exits.
    pub async fn stop(mut self) {
        signal(&self.child, "TERM");
        let r = tokio::time::timeout(Duration::from_secs(20), self.child.wait()).await;
        assert!(r.expect("the testoperator exits after SIGTERM").unwrap().success());
    }

    /// SIGKILL: every connection cut, as a crash would.
    pub async fn crash(mut self) {
        let _ = self.child.kill().await;
    }
}

pub fn signal(child: &Child, sig: &str) {
    if let Some(pid) = child.id() {
        let _ = std::process::Command::new("kill").arg(format!("-{sig}")).arg(pid.to_string()).status();
    }
}

pub async fn unix_channel(addr: &str) -> Channel {
    let path = PathBuf::from(addr.strip_prefix("unix://").unwrap());
    // A bound on every call, so that a broken tunnel fails a test instead
    // of hanging it (the proxy waits for a plugin to register).
    Endpoint::from_static("http://localhost")
        .timeout(Duration::from_secs(60))
        .connect_with_connector(tower::service_fn(move |_| {
            let path = path.clone();
            async move {
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tokio::net::UnixStream::connect(path).await?))
            }
        }))
        .await
        .expect("connect to the proxy")
}

/// A plugin served in this process; dropping the handle leaves it running,
/// `shutdown` drains it.
pub struct Plugin {
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), opf::Error>>,
}

impl Plugin {
    pub fn start(target: &str, configure: impl FnOnce(opf::PluginBuilder) -> opf::PluginBuilder) -> Self {
        let b = opf::Plugin::builder("conformance", "v0.0.0-test")
            .add_service(Conformance::default().server())
            .drain_timeout(Duration::from_secs(5));
        let plugin = configure(b).build(target).expect("a valid plugin");
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(plugin.serve_with_shutdown(async move {
            let _ = rx.await;
        }));
        Self { stop: Some(tx), task }
    }

    /// Drains the plugin and waits for it to return.
    pub async fn shutdown(mut self) {
        let _ = self.stop.take().unwrap().send(());
        let r = tokio::time::timeout(Duration::from_secs(20), &mut self.task).await;
        r.expect("the plugin drains in time").unwrap().unwrap();
    }
}

pub fn init_logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .with_test_writer()
        .try_init();
}
