//! `liger-serve`: reads settings (flags > env > TOML file > defaults), sets up logging,
//! binds the listener and hands over to [`liger_server::serve`].

use anyhow::Context;
use liger_server::settings::Settings;

fn main() -> std::process::ExitCode {
    // Before any thread exists: it sets an environment variable (see liger_model::threads),
    // which is why the tokio runtime is built by hand below rather than by #[tokio::main].
    liger_model::threads::init(None);
    if let Err(e) = liger_server::logging::init() {
        eprintln!("liger-serve: {e}");
        return std::process::ExitCode::FAILURE;
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("liger-serve: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("liger-serve: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run() -> anyhow::Result<()> {
    let settings = Settings::from_env_and_args()?;
    let niced = liger_model::threads::set_compute_nice(settings.compute_nice);
    let pinned = if settings.pin_compute_threads {
        liger_model::threads::pin_compute_threads()
    } else {
        0
    };
    tracing::debug!(
        threads = niced,
        nice = settings.compute_nice,
        pinned,
        "model threads' priority and CPUs"
    );
    let listener = tokio::net::TcpListener::bind((settings.host.as_str(), settings.port))
        .await
        .with_context(|| format!("binding {}:{}", settings.host, settings.port))?;
    liger_server::serve(settings, listener).await
}
