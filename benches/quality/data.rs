//! The synthetic document-QA task: documents made of many short facts in
//! plain English words about invented people, and questions whose answer is
//! in exactly one fact. Test documents are about people whose names never
//! occur in training, so a model can only answer by reading the context.

use rand::seq::{IndexedRandom, SliceRandom};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// One question about one document.
#[derive(Debug, Clone)]
pub struct Example {
    pub context: String,
    pub question: String,
    pub answer: String,
}

/// What a fact says about a person, how it is asked, and its possible values.
struct Attribute {
    fact: &'static str,
    question: &'static str,
    values: [&'static str; 12],
}

const ATTRIBUTES: [Attribute; 5] = [
    Attribute {
        fact: "{n} lives in {v}.",
        question: "Where does {n} live?",
        values: [
            "paris", "london", "cairo", "lima", "oslo", "tokyo", "dublin", "madrid", "quito",
            "delhi", "perth", "rome",
        ],
    },
    Attribute {
        fact: "{n} works as a {v}.",
        question: "What is the job of {n}?",
        values: [
            "baker", "doctor", "farmer", "pilot", "sailor", "teacher", "painter", "singer",
            "writer", "driver", "nurse", "tailor",
        ],
    },
    Attribute {
        fact: "The favourite colour of {n} is {v}.",
        question: "What is the favourite colour of {n}?",
        values: [
            "red", "blue", "green", "yellow", "black", "white", "orange", "purple", "grey", "pink",
            "brown", "gold",
        ],
    },
    Attribute {
        fact: "{n} has a pet {v}.",
        question: "What pet does {n} have?",
        values: [
            "cat", "dog", "horse", "parrot", "rabbit", "goat", "fish", "mouse", "owl", "snake",
            "frog", "duck",
        ],
    },
    Attribute {
        fact: "{n} likes to eat {v}.",
        question: "What does {n} like to eat?",
        values: [
            "bread", "rice", "apples", "cheese", "soup", "beans", "cake", "pasta", "eggs", "plums",
            "nuts", "honey",
        ],
    },
];

const SYLLABLES: [&str; 24] = [
    "ka", "lo", "mi", "ren", "tu", "sa", "vo", "ni", "bel", "dor", "fa", "gi", "ha", "jo", "ki",
    "lu", "mar", "nor", "pe", "qui", "ros", "ti", "wen", "zo",
];

/// Every invented name (two or three syllables, capitalised), split into the
/// names of training and of test documents: one in five is held out.
fn names() -> (Vec<String>, Vec<String>) {
    let mut all = Vec::new();
    for a in SYLLABLES {
        for b in SYLLABLES {
            all.push(format!("{a}{b}"));
            for c in SYLLABLES {
                all.push(format!("{a}{b}{c}"));
            }
        }
    }
    let capitalise = |s: &String| {
        let mut chars = s.chars();
        chars
            .next()
            .map(|c| c.to_uppercase().chain(chars).collect())
            .unwrap_or_default()
    };
    let (test, train): (Vec<_>, Vec<_>) = all.iter().enumerate().partition(|(i, _)| i % 5 == 0);
    let pick = |v: Vec<(usize, &String)>| v.into_iter().map(|(_, s)| capitalise(s)).collect();
    (pick(train), pick(test))
}

/// How many people a document is about: each brings five facts of about
/// eight tokens, so 12..=45 people make documents of about 500..2000 tokens.
const PEOPLE: std::ops::RangeInclusive<usize> = 12..=45;

/// `documents` documents about people drawn from `names`, with
/// `questions_per_document` questions each (distinct facts).
fn generate(
    names: &[String],
    documents: usize,
    questions_per_document: usize,
    rng: &mut ChaCha8Rng,
) -> Vec<Example> {
    let mut out = Vec::with_capacity(documents * questions_per_document);
    for _ in 0..documents {
        let count = rng.random_range(PEOPLE);
        let people: Vec<&String> = names.choose_multiple(rng, count).collect();
        let mut facts = Vec::new();
        for (p, name) in people.iter().enumerate() {
            for (a, attribute) in ATTRIBUTES.iter().enumerate() {
                let value = attribute.values[rng.random_range(0..attribute.values.len())];
                facts.push((
                    p,
                    a,
                    attribute.fact.replace("{n}", name).replace("{v}", value),
                    value,
                ));
            }
        }
        facts.shuffle(rng);
        let context = facts
            .iter()
            .map(|(_, _, text, _)| text.as_str())
            .collect::<Vec<_>>()
            .join(" ");
        for (p, a, _, value) in facts.choose_multiple(rng, questions_per_document) {
            out.push(Example {
                context: context.clone(),
                question: ATTRIBUTES[*a].question.replace("{n}", people[*p]),
                answer: (*value).to_string(),
            });
        }
    }
    out
}

/// The task's training and test examples, the same for the same seed.
pub struct Task {
    pub train: Vec<Example>,
    pub test: Vec<Example>,
}

impl Task {
    pub fn new(seed: u64, train_documents: usize, test_documents: usize) -> Task {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let (train_names, test_names) = names();
        Task {
            train: generate(&train_names, train_documents, 4, &mut rng),
            test: generate(&test_names, test_documents, 2, &mut rng),
        }
    }

    /// Text to train the tokenizer on: every training context, question
    /// and answer, plus the test names' syllables through the training names.
    pub fn corpus(&self) -> Vec<String> {
        self.train
            .iter()
            .flat_map(|e| [e.context.clone(), e.question.clone(), e.answer.clone()])
            .collect()
    }
}
