//! A checkpoint edit as data: what one bitmap-directory update of the top image does. The
//! policy that decides it lives in `checkpoint::edit`; `Writer::apply` (bitmap_dir.rs) carries
//! it out in one directory switch.

/// One update of the top image's bitmap directory. Bitmap numbers are indexes into the top
/// image's bitmap list (`Qcow2Image::bitmaps`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DirEdit {
    /// Add an enabled bitmap; `disable` stops another one recording in the same update.
    Add {
        name: String,
        granularity_bits: u8,
        disable: Option<usize>,
    },
    /// Delete bitmap `bitmap` (its fate says what becomes of its bits) and rename others.
    Remove {
        bitmap: usize,
        fate: Fate,
        renames: Vec<(usize, String)>,
    },
}

/// What becomes of a deleted checkpoint's bitmap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fate {
    /// Gone with its bits (cumulative scheme, or no older checkpoint to give them to).
    Drop,
    /// ORed into `into` first; `enable` makes `into` the recording bitmap.
    MergeInto { into: usize, enable: bool },
    /// Kept under the older checkpoint's bitmap name (that one lives in a backing layer).
    Rename(String),
}
