//! A YAML stream cut into its documents' text, so that each document is parsed on its own
//! by a parser that streams (serde-saphyr) instead of one that first loads every event of
//! a document (serde_yaml: for a 100k-CIDR policy, most of `exec`'s peak memory).

/// The documents of `text`, in order, each with its own markers. A line that starts with
/// `---` or `...` followed by a space, a tab or its end is a document marker wherever it
/// stands (YAML forbids one inside a scalar), so cutting there is exact. Text before the
/// first `---` or after a `...` is a document only if it holds content: comments, blank
/// lines and directives are not.
pub fn documents(text: &str) -> Vec<&str> {
    let mut documents = Vec::new();
    let mut start = 0;
    let mut explicit = false;
    let mut offset = 0;
    for line in text.split_inclusive('\n') {
        let line_start = offset;
        offset += line.len();
        if is_marker(line, "---") {
            if explicit || has_content(&text[start..line_start]) {
                documents.push(&text[start..line_start]);
            }
            start = line_start;
            explicit = true;
        } else if is_marker(line, "...") {
            if explicit || has_content(&text[start..line_start]) {
                documents.push(&text[start..offset]);
            }
            start = offset;
            explicit = false;
        }
    }
    if explicit || has_content(&text[start..]) {
        documents.push(&text[start..]);
    }
    documents
}

fn is_marker(line: &str, marker: &str) -> bool {
    line.strip_prefix(marker)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with([' ', '\t', '\r', '\n']))
}

fn has_content(text: &str) -> bool {
    text.lines().any(|line| {
        let trimmed = line.trim_start_matches('\u{feff}').trim();
        !trimmed.is_empty() && !trimmed.starts_with('#') && !line.starts_with('%')
    })
}

#[cfg(test)]
mod tests {
    use super::documents;

    #[test]
    fn one_document_without_markers_is_the_whole_text() {
        assert_eq!(documents("a: 1\nb: 2\n"), ["a: 1\nb: 2\n"]);
    }

    #[test]
    fn markers_start_documents_and_stay_with_them() {
        let text = "a: 1\n---\nb: 2\n--- {c: 3}\n";
        assert_eq!(documents(text), ["a: 1\n", "---\nb: 2\n", "--- {c: 3}\n"]);
    }

    #[test]
    fn a_leading_marker_after_comments_and_directives_opens_the_first_document() {
        let text = "# policies\n%YAML 1.2\n---\na: 1\n";
        assert_eq!(documents(text), ["---\na: 1\n"]);
    }

    #[test]
    fn explicit_empty_documents_count() {
        assert_eq!(documents("---\n---\na: 1\n"), ["---\n", "---\na: 1\n"]);
    }

    #[test]
    fn an_end_marker_closes_a_document_and_what_follows_needs_content() {
        let text = "a: 1\n...\n# trailing\n";
        assert_eq!(documents(text), ["a: 1\n...\n"]);
        assert_eq!(documents("a: 1\n...\nb: 2\n"), ["a: 1\n...\n", "b: 2\n"]);
    }

    #[test]
    fn dashes_that_are_not_markers_do_not_cut() {
        let text = "a: |\n  ---\n  x\nb: ----\n---x: 1\n";
        assert_eq!(documents(text), [text]);
    }

    #[test]
    fn crlf_markers_cut() {
        assert_eq!(
            documents("a: 1\r\n---\r\nb: 2\r\n"),
            ["a: 1\r\n", "---\r\nb: 2\r\n"]
        );
    }
}
