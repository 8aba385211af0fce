//! The shape of the API's uploads: a spec or a package sent with its files as
//! `multipart/form-data`, parts named `spec` or `package`, `file` and `folder`.

/// The largest spec or package text.
pub const MAX_SPEC_BYTES: usize = 1 << 20;

/// The part header that marks an uploaded file executable (`true`): it is staged with the
/// owner's execute bit, which a job's input and a folder blob's manifest keep.
pub const EXECUTABLE: &str = "x-hearth-executable";

/// The `multipart/form-data` body of `POST /api/v1/jobs` and `POST /api/v1/remote-jobs` (for the
/// OpenAPI document; the handlers read the parts as they stream in).
#[derive(Debug, utoipa::ToSchema)]
pub struct SpecUpload {
    /// The job spec's TOML text. Its `module`, `image` and `inputs` name uploaded files or
    /// folders by their path under the upload root.
    pub spec: String,
    /// One part per file, its file name its path under the upload root (such as
    /// `f/0/hello.wasm`): relative, no `.` or `..`, no NUL or backslash, each sent once. A part
    /// header `x-hearth-executable: true` marks an executable file.
    #[schema(value_type = Vec<String>, format = Binary)]
    pub file: Vec<Vec<u8>>,
    /// An empty folder to make, one part each: its path under the upload root, as text.
    pub folder: Vec<String>,
}

/// The `multipart/form-data` body of `POST /api/v1/packages`.
#[derive(Debug, utoipa::ToSchema)]
pub struct PackageUpload {
    /// The package's TOML text. Each task's `spec` names an uploaded job spec, whose own paths are
    /// relative to its folder under the upload root.
    pub package: String,
    /// One part per file (task specs included), as in `SpecUpload`.
    #[schema(value_type = Vec<String>, format = Binary)]
    pub file: Vec<Vec<u8>>,
    /// An empty folder to make, one part each: its path under the upload root, as text.
    pub folder: Vec<String>,
}
