//! The one error type of the testbed's cluster, fault and benchmark layer. The QEMU
//! guest machinery keeps its own (`guest::GuestError`).

/// Why a testbed command failed; every variant says what to do next where it can.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file or directory operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A process could not be found, started, signalled or stopped.
    #[error("{0}")]
    Process(String),
    /// The state file is missing, unreadable or does not match the request.
    #[error("{0}")]
    State(String),
    /// A command-line value that cannot work (unknown node, bad size, ...).
    #[error("{0}")]
    Usage(String),
    /// A storage node did not start or did not become ready.
    #[error("{0}")]
    Node(String),
    /// Network namespaces or links could not be set up or changed.
    #[error("{0}")]
    Network(String),
    /// A benchmark step (fio, nbdkit, gnuplot, the report) failed.
    #[error("{0}")]
    Bench(String),
}

impl Error {
    /// Wraps an I/O error with what was being done.
    pub fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
        let context = context.into();
        move |source| Error::Io { context, source }
    }
}
