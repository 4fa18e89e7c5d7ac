//! Exact match and token F1 with SQuAD's answer normalisation (the official
//! evaluation script, which MRQA reuses): lowercase, drop ASCII punctuation,
//! drop the articles a/an/the, collapse whitespace.

use std::collections::HashMap;

/// The normalised answer as its whitespace-separated tokens.
pub fn normalize(text: &str) -> Vec<String> {
    let lower = text.to_lowercase();
    let no_punct: String = lower
        .chars()
        .filter(|c| !c.is_ascii_punctuation())
        .collect();
    remove_articles(&no_punct)
        .split_whitespace()
        .map(str::to_string)
        .collect()
}

/// Python's `re.sub(r"\b(a|an|the)\b", " ", s)`: a whole run of word
/// characters that is an article becomes a space.
fn remove_articles(s: &str) -> String {
    let is_word = |c: char| c.is_alphanumeric() || c == '_';
    let mut out = String::with_capacity(s.len());
    let mut word = String::new();
    let flush = |word: &mut String, out: &mut String| {
        if matches!(word.as_str(), "a" | "an" | "the") {
            out.push(' ');
        } else {
            out.push_str(word);
        }
        word.clear();
    };
    for c in s.chars() {
        if is_word(c) {
            word.push(c);
        } else {
            flush(&mut word, &mut out);
            out.push(c);
        }
    }
    flush(&mut word, &mut out);
    out
}

/// 1 when the normalised prediction equals the normalised answer, else 0.
pub fn exact_match(prediction: &str, answer: &str) -> f64 {
    f64::from(u8::from(normalize(prediction) == normalize(answer)))
}

/// Harmonic mean of token precision and recall over the normalised texts
/// (1 when both are empty, 0 when only one is).
pub fn f1(prediction: &str, answer: &str) -> f64 {
    let predicted = normalize(prediction);
    let expected = normalize(answer);
    if predicted.is_empty() || expected.is_empty() {
        return f64::from(u8::from(predicted == expected));
    }
    let mut counts: HashMap<&str, usize> = HashMap::new();
    for t in &expected {
        *counts.entry(t.as_str()).or_default() += 1;
    }
    let mut common = 0usize;
    for t in &predicted {
        if let Some(n) = counts.get_mut(t.as_str()).filter(|n| **n > 0) {
            *n -= 1;
            common += 1;
        }
    }
    if common == 0 {
        return 0.0;
    }
    let precision = common as f64 / predicted.len() as f64;
    let recall = common as f64 / expected.len() as f64;
    2.0 * precision * recall / (precision + recall)
}

/// The best score of `prediction` against any of the accepted `answers`.
pub fn best_of(score: fn(&str, &str) -> f64, prediction: &str, answers: &[String]) -> f64 {
    answers
        .iter()
        .map(|a| score(prediction, a))
        .fold(0.0, f64::max)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalisation_follows_squad() {
        assert_eq!(normalize("The  Eiffel-Tower!"), ["eiffeltower"]);
        assert_eq!(normalize("an apple, a pear"), ["apple", "pear"]);
        // `_` is punctuation too (Python's string.punctuation).
        assert_eq!(normalize("Theory of an_x"), ["theory", "of", "anx"]);
        assert_eq!(normalize("the—end"), ["—end"]);
        assert!(normalize(" a the. ").is_empty());
    }

    #[test]
    fn exact_match_and_f1() {
        assert_eq!(exact_match("The Beatles.", "beatles"), 1.0);
        assert_eq!(exact_match("Beatles band", "beatles"), 0.0);
        // 1 common token: precision 1/2, recall 1/1.
        assert!((f1("Beatles band", "the Beatles") - 2.0 / 3.0).abs() < 1e-12);
        assert_eq!(f1("a", "the"), 1.0);
        assert_eq!(f1("", "paris"), 0.0);
        assert_eq!(f1("rome", "paris"), 0.0);
        // Repeated tokens count once per occurrence.
        assert!((f1("paris paris", "paris") - 2.0 / 3.0).abs() < 1e-12);
        let answers = ["London".to_string(), "Paris, France".to_string()];
        assert_eq!(best_of(exact_match, "paris france", &answers), 1.0);
        assert_eq!(best_of(f1, "berlin", &answers), 0.0);
    }
}
