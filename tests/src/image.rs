//! Test images: random tar layers (gzip or plain), configs and manifests written as an OCI layout and pushed to
//! a registry with `skopeo`. Each image knows the digests of every blob, so tests can check what was pulled.

use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result, bail};
use rand::{Rng, SeedableRng};
use serde_json::json;

use crate::sha256_digest;

/// A blob with its digest and media type.
#[derive(Debug, Clone)]
pub struct Blob {
    /// The bytes.
    pub data: Vec<u8>,
    /// `sha256:…`.
    pub digest: String,
    /// Media type.
    pub media_type: String,
}

impl Blob {
    fn new(data: Vec<u8>, media_type: &str) -> Self {
        Self { digest: sha256_digest(&data), data, media_type: media_type.to_owned() }
    }

    fn descriptor(&self) -> serde_json::Value {
        json!({"mediaType": self.media_type, "digest": self.digest, "size": self.data.len()})
    }
}

/// Layer compression.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// `tar+gzip` (fast level: random data does not compress anyway).
    Gzip,
    /// Plain tar (large benchmark images: no time spent compressing).
    None,
}

/// One platform's image: layers, config and manifest.
#[derive(Debug, Clone)]
pub struct Image {
    /// Layers in order.
    pub layers: Vec<Blob>,
    /// The config blob.
    pub config: Blob,
    /// The manifest.
    pub manifest: Blob,
}

/// Builds a random single-file tar layer of about `size` bytes from `seed`.
pub fn random_layer(size: usize, seed: u64, compression: Compression) -> Result<(Blob, String)> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut content = vec![0u8; size];
    rng.fill(&mut content[..]);
    let mut tar = tar::Builder::new(Vec::with_capacity(size + 4096));
    let mut header = tar::Header::new_gnu();
    header.set_size(size as u64);
    header.set_mode(0o644);
    header.set_mtime(0);
    header.set_cksum();
    tar.append_data(&mut header, format!("data-{seed}.bin"), &content[..])?;
    let tar = tar.into_inner()?;
    let diff_id = sha256_digest(&tar);
    let blob = match compression {
        Compression::None => Blob::new(tar, "application/vnd.oci.image.layer.v1.tar"),
        Compression::Gzip => {
            use std::io::Write;
            let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            enc.write_all(&tar)?;
            Blob::new(enc.finish()?, "application/vnd.oci.image.layer.v1.tar+gzip")
        }
    };
    Ok((blob, diff_id))
}

impl Image {
    /// An image of `layer_sizes` random layers for `arch` (linux), built from `seed`.
    pub fn random(layer_sizes: &[usize], seed: u64, arch: &str, compression: Compression) -> Result<Self> {
        let mut layers = Vec::new();
        let mut diff_ids = Vec::new();
        for (i, &size) in layer_sizes.iter().enumerate() {
            let (blob, diff_id) = random_layer(size, seed.wrapping_mul(1000).wrapping_add(i as u64), compression)?;
            layers.push(blob);
            diff_ids.push(diff_id);
        }
        let config = json!({
            "architecture": arch, "os": "linux",
            "config": {"Cmd": ["/bin/true"]},
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
            "history": [{"created_by": format!("shoal testbed seed {seed}")}],
        });
        let config = Blob::new(serde_json::to_vec(&config)?, "application/vnd.oci.image.config.v1+json");
        let manifest = json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": config.descriptor(),
            "layers": layers.iter().map(Blob::descriptor).collect::<Vec<_>>(),
        });
        let manifest = Blob::new(serde_json::to_vec(&manifest)?, "application/vnd.oci.image.manifest.v1+json");
        Ok(Self { layers, config, manifest })
    }

    /// Total bytes of all blobs.
    pub fn size(&self) -> u64 {
        self.blobs().map(|b| b.data.len() as u64).sum()
    }

    /// Config and layers.
    pub fn blobs(&self) -> impl Iterator<Item = &Blob> {
        std::iter::once(&self.config).chain(&self.layers)
    }
}

/// What goes into a layout: one image or a multi-platform index.
#[derive(Debug, Clone)]
pub enum Artifact {
    /// A single-platform image.
    Image(Image),
    /// An OCI image index over several images.
    Index {
        /// The images, each with its architecture.
        images: Vec<(String, Image)>,
        /// The index blob.
        index: Blob,
    },
}

impl Artifact {
    /// An index over random images for each of `arches`.
    pub fn multi_platform(layer_sizes: &[usize], seed: u64, arches: &[&str]) -> Result<Self> {
        let mut images = Vec::new();
        for (i, arch) in arches.iter().enumerate() {
            images
                .push((arch.to_string(), Image::random(layer_sizes, seed + 100 * i as u64, arch, Compression::Gzip)?));
        }
        let manifests: Vec<_> = images
            .iter()
            .map(|(arch, img)| {
                let mut d = img.manifest.descriptor();
                d["platform"] = json!({"architecture": arch, "os": "linux"});
                d
            })
            .collect();
        let index =
            json!({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": manifests});
        let index = Blob::new(serde_json::to_vec(&index)?, "application/vnd.oci.image.index.v1+json");
        Ok(Self::Index { images, index })
    }

    /// The top-level manifest (image manifest or index).
    pub fn top(&self) -> &Blob {
        match self {
            Self::Image(i) => &i.manifest,
            Self::Index { index, .. } => index,
        }
    }

    /// Every blob and manifest below the top.
    pub fn all_blobs(&self) -> Vec<&Blob> {
        match self {
            Self::Image(i) => i.blobs().collect(),
            Self::Index { images, .. } => {
                images.iter().flat_map(|(_, i)| std::iter::once(&i.manifest).chain(i.blobs())).collect()
            }
        }
    }

    /// Writes the artifact as an OCI layout with `tag` in `dir`.
    pub fn write_layout(&self, dir: &Path, tag: &str) -> Result<()> {
        let blobs = dir.join("blobs/sha256");
        std::fs::create_dir_all(&blobs)?;
        for b in self.all_blobs().into_iter().chain(std::iter::once(self.top())) {
            std::fs::write(blobs.join(&b.digest["sha256:".len()..]), &b.data)?;
        }
        std::fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#)?;
        let mut top = self.top().descriptor();
        top["annotations"] = json!({"org.opencontainers.image.ref.name": tag});
        let index = json!({"schemaVersion": 2, "manifests": [top]});
        std::fs::write(dir.join("index.json"), serde_json::to_vec(&index)?)?;
        Ok(())
    }
}

/// How skopeo should write the image to the registry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// As built (OCI manifests and index).
    Oci,
    /// Converted to Docker schema2 manifests (and a Docker manifest list for an index).
    DockerV2S2,
}

/// Pushes `artifact` as `<registry>/<repo>:<tag>` with skopeo. Returns the digest of the top manifest in the
/// registry (differs from the artifact's when converted).
pub fn push(
    artifact: &Artifact,
    registry: &str,
    repo: &str,
    tag: &str,
    creds: Option<&str>,
    format: Format,
) -> Result<String> {
    let dir = tempfile::Builder::new().prefix("shoal-layout").tempdir()?;
    artifact.write_layout(dir.path(), tag)?;
    let mut cmd = Command::new("skopeo");
    cmd.args(["copy", "--quiet", "--dest-tls-verify=false", "--src-tls-verify=false"]);
    if matches!(artifact, Artifact::Index { .. }) {
        cmd.arg("--all");
    }
    match format {
        // Without this, skopeo compresses plain-tar layers and rewrites the manifest: tests need the bytes they built.
        Format::Oci => cmd.arg("--preserve-digests"),
        Format::DockerV2S2 => cmd.args(["--format", "v2s2"]),
    };
    if let Some(c) = creds {
        cmd.args(["--dest-creds", c]);
    }
    let digest_file = dir.path().join("pushed.digest");
    cmd.arg("--digestfile").arg(&digest_file);
    cmd.arg(format!("oci:{}:{tag}", dir.path().display()));
    cmd.arg(format!("docker://{registry}/{repo}:{tag}"));
    let out = cmd.output().context("running skopeo")?;
    if !out.status.success() {
        bail!("skopeo copy failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(std::fs::read_to_string(digest_file)?.trim().to_owned())
}
