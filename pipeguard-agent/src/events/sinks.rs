//! Where records go besides HTTP subscribers: stdout (JSON lines) and an append-only file
//! with size-based rotation. Both buffer; their writer thread (`sink_queue`) flushes whenever
//! it has nothing more queued.

use std::{
    fs::{File, OpenOptions},
    io::{self, BufWriter, Write},
    path::PathBuf,
};

use super::record::Record;

/// Where a writer thread puts records.
pub trait Sink: Send + 'static {
    fn write(&mut self, record: &Record) -> io::Result<()>;
    fn flush(&mut self) -> io::Result<()>;
}

/// JSON lines on stdout.
pub struct Stdout(BufWriter<io::Stdout>);

impl Default for Stdout {
    fn default() -> Self {
        Self(BufWriter::new(io::stdout()))
    }
}

impl Sink for Stdout {
    fn write(&mut self, record: &Record) -> io::Result<()> {
        serde_json::to_writer(&mut self.0, record).map_err(io::Error::other)?;
        self.0.write_all(b"\n")
    }

    fn flush(&mut self) -> io::Result<()> {
        self.0.flush()
    }
}

/// Appends JSON lines to `path`; past `max_bytes` it becomes `path.1` (older ones shift
/// to `.2` … `.keep`, the oldest is deleted) and a new file starts.
pub struct FileSink {
    path: PathBuf,
    max_bytes: u64,
    keep: usize,
    file: BufWriter<File>,
    written: u64,
}

impl FileSink {
    pub fn open(path: PathBuf, max_bytes: u64, keep: usize) -> io::Result<Self> {
        let file = OpenOptions::new().create(true).append(true).open(&path)?;
        let written = file.metadata()?.len();
        Ok(Self {
            path,
            max_bytes,
            keep: keep.max(1),
            file: BufWriter::new(file),
            written,
        })
    }
}

impl Sink for FileSink {
    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }

    fn write(&mut self, record: &Record) -> io::Result<()> {
        let mut line = serde_json::to_vec(record).map_err(io::Error::other)?;
        line.push(b'\n');
        if self.written > 0 && self.written + line.len() as u64 > self.max_bytes {
            self.rotate()?;
        }
        self.file.write_all(&line)?;
        self.written += line.len() as u64;
        Ok(())
    }
}

impl FileSink {
    fn rotated(&self, n: usize) -> PathBuf {
        let mut name = self.path.clone().into_os_string();
        name.push(format!(".{n}"));
        PathBuf::from(name)
    }

    fn rotate(&mut self) -> io::Result<()> {
        self.file.flush()?;
        let _ = std::fs::remove_file(self.rotated(self.keep));
        for n in (1..self.keep).rev() {
            let from = self.rotated(n);
            if from.exists() {
                std::fs::rename(&from, self.rotated(n + 1))?;
            }
        }
        std::fs::rename(&self.path, self.rotated(1))?;
        self.file = BufWriter::new(OpenOptions::new().create(true).append(true).open(&self.path)?);
        self.written = 0;
        Ok(())
    }
}

/// A record with only `count` set, for tests.
#[cfg(test)]
pub(crate) fn sample(n: u64) -> Record {
    Record::drops("t".into(), n, "n".into(), None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotates_by_size_and_keeps_a_bounded_number_of_files() {
        let dir = std::env::temp_dir().join(format!("pg-rotate-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("events.jsonl");
        let mut sink = FileSink::open(path.clone(), 1000, 2).unwrap();
        for n in 0..100 {
            sink.write(&sample(n)).unwrap();
        }
        sink.flush().unwrap();
        let mut names: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, ["events.jsonl", "events.jsonl.1", "events.jsonl.2"]);
        for name in &names {
            let len = std::fs::metadata(dir.join(name)).unwrap().len();
            assert!(len <= 1000, "{name} is {len} bytes");
        }
        // The newest record is in the live file, and every line is a whole record.
        let live = std::fs::read_to_string(&path).unwrap();
        let last: Record = serde_json::from_str(live.lines().last().unwrap()).unwrap();
        assert_eq!(last.count, 99);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
