//! The synthetic document-QA task: documents made of many short facts in
//! plain English words about invented people, and questions whose answer is
//! in exactly one fact. Test documents are about people whose names never
//! occur in training, so a model can only answer by reading the context.

use std::ops::RangeInclusive;

use rand::seq::{IndexedRandom, SliceRandom};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use sac::prompt::{CONTEXT_PREFIX, PromptLayout};

/// One question about one document.
#[derive(Debug, Clone)]
pub struct Example {
    pub context: String,
    pub question: String,
    /// The value with the space before it, as inside a fact: its tokens are
    /// then the fact's own, and answering is copying (the answer starts a
    /// line, so a plain "paris" would be another token than " paris").
    /// In [`AnswerForm::Fact`], the fact's words before the value come first.
    pub answer: String,
    /// The part of `answer` before the value (empty for a bare value).
    pub before_value: String,
}

/// How the task's answers are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum AnswerForm {
    /// The value alone: " paris".
    Value,
    /// The whole fact: " Kalomi lives in paris". Its words up to the value
    /// repeat the question's, and then the value follows the same words as
    /// in the document: an induction (find the words, copy what came next)
    /// rather than finding the fact by a name inside the question.
    Fact,
}

/// What a fact says about a person, how it is asked, and its possible values.
struct Attribute {
    fact: &'static str,
    question: &'static str,
    /// The question asked the other way: who has this value.
    reverse: &'static str,
    values: [&'static str; 12],
}

const ATTRIBUTES: [Attribute; 5] = [
    Attribute {
        fact: "{n} lives in {v}.",
        question: "Where does {n} live?",
        reverse: "Who lives in {v}?",
        values: [
            "paris", "london", "cairo", "lima", "oslo", "tokyo", "dublin", "madrid", "quito",
            "delhi", "perth", "rome",
        ],
    },
    Attribute {
        fact: "{n} works as a {v}.",
        question: "What is the job of {n}?",
        reverse: "Who works as a {v}?",
        values: [
            "baker", "doctor", "farmer", "pilot", "sailor", "teacher", "painter", "singer",
            "writer", "driver", "nurse", "tailor",
        ],
    },
    Attribute {
        fact: "The favourite colour of {n} is {v}.",
        question: "What is the favourite colour of {n}?",
        reverse: "Whose favourite colour is {v}?",
        values: [
            "red", "blue", "green", "yellow", "black", "white", "orange", "purple", "grey", "pink",
            "brown", "gold",
        ],
    },
    Attribute {
        fact: "{n} has a pet {v}.",
        question: "What pet does {n} have?",
        reverse: "Who has a pet {v}?",
        values: [
            "cat", "dog", "horse", "parrot", "rabbit", "goat", "fish", "mouse", "owl", "snake",
            "frog", "duck",
        ],
    },
    Attribute {
        fact: "{n} likes to eat {v}.",
        question: "What does {n} like to eat?",
        reverse: "Who likes to eat {v}?",
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

/// How many people a document of the task's training and test sets is
/// about: each brings five facts of about eight tokens, so 12..=45 people
/// make documents of about 500..2000 tokens.
pub const PEOPLE: RangeInclusive<usize> = 12..=45;

/// One document about `people` people drawn from `names`, with
/// `questions` questions about distinct facts of it (at most all of them).
pub fn document(
    names: &[String],
    people: RangeInclusive<usize>,
    questions: usize,
    form: AnswerForm,
    rng: &mut ChaCha8Rng,
) -> Vec<Example> {
    training_document(names, people, questions, 0, Telling::default(), form, rng).0
}

/// How a base-model training document tells its facts; the default is the
/// test documents' way.
#[derive(Debug, Clone, Copy, Default)]
pub struct Telling {
    /// Tell the facts twice, the second time in another order: the
    /// document's own next-token loss then rewards finding a fact by name
    /// (an induction) on every repeated value.
    pub repeat: bool,
    /// Each fact is a name and a value alone ("Kalomi paris."), answered
    /// the same way. Finding such a fact by name needs only the token
    /// before the value; a model that does that finds the same lookup
    /// across a fact's words sooner (in the PyTorch drill of
    /// docs/benchmarks.md, in half the steps).
    pub short: bool,
    /// How many attributes the document tells (drawn at random for the
    /// whole document, each person one fact of each); all when `None`. With
    /// one, a fact is found by name alone, since no other attribute's value
    /// can stand in; with two or more, by name and attribute together.
    pub attributes: Option<usize>,
}

/// [`document`], plus up to `reverse` questions asked the other way ("Who
/// lives in paris?", answered with the name) about values no one else in the
/// document shares. Only the base model trains on those: to answer them,
/// a fact's value must carry whose it is, which is also what finding a fact
/// by name needs.
pub fn training_document(
    names: &[String],
    people: RangeInclusive<usize>,
    questions: usize,
    reverse: usize,
    telling: Telling,
    form: AnswerForm,
    rng: &mut ChaCha8Rng,
) -> (Vec<Example>, Vec<Example>) {
    let count = rng.random_range(people);
    let people: Vec<&String> = names.choose_multiple(rng, count).collect();
    let template = |a: usize| {
        if telling.short {
            "{n} {v}."
        } else {
            ATTRIBUTES[a].fact
        }
    };
    let told_attributes: Vec<usize> = match telling.attributes {
        Some(count) => rand::seq::index::sample(rng, ATTRIBUTES.len(), count).into_vec(),
        None => (0..ATTRIBUTES.len()).collect(),
    };
    let mut facts = Vec::new();
    for (p, name) in people.iter().enumerate() {
        for &a in &told_attributes {
            let attribute = &ATTRIBUTES[a];
            let value = attribute.values[rng.random_range(0..attribute.values.len())];
            facts.push((
                p,
                a,
                template(a).replace("{n}", name).replace("{v}", value),
                value,
            ));
        }
    }
    facts.shuffle(rng);
    let mut told: Vec<&str> = facts.iter().map(|(_, _, text, _)| text.as_str()).collect();
    if telling.repeat {
        let mut again = told.clone();
        again.shuffle(rng);
        told.extend(again);
    }
    let context = told.join(" ");
    let forward = facts
        .choose_multiple(rng, questions)
        .map(|(p, a, _, value)| {
            let before_value = match form {
                AnswerForm::Value => String::new(),
                AnswerForm::Fact => {
                    let fact = template(*a).replace("{n}", people[*p]);
                    let words = fact.split("{v}").next().unwrap_or_default();
                    format!(" {}", words.trim_end())
                }
            };
            Example {
                context: context.clone(),
                question: ATTRIBUTES[*a].question.replace("{n}", people[*p]),
                answer: format!("{before_value} {value}"),
                before_value,
            }
        })
        .collect();
    let unique: Vec<_> = facts
        .iter()
        .filter(|(_, a, _, v)| {
            reverse > 0 && facts.iter().filter(|f| f.1 == *a && f.3 == *v).count() == 1
        })
        .collect();
    let backward = unique
        .choose_multiple(rng, reverse)
        .map(|(p, a, _, value)| Example {
            context: context.clone(),
            question: ATTRIBUTES[*a].reverse.replace("{v}", value),
            answer: format!(" {}", people[*p]),
            before_value: String::new(),
        })
        .collect();
    (forward, backward)
}

/// A text for the SAC adapters' `pretrain` stage: a document about `people`
/// people of `names` that tells its facts twice, the second time in another
/// order. Cut after the first telling, its continuation can be predicted
/// only by finding each fact in the compressed context: a signal on every
/// value and name, where a question gives one.
pub fn pretraining_text(
    names: &[String],
    people: RangeInclusive<usize>,
    rng: &mut ChaCha8Rng,
) -> String {
    let telling = Telling {
        repeat: true,
        ..Telling::default()
    };
    let (mut examples, _) = training_document(names, people, 1, 0, telling, AnswerForm::Value, rng);
    examples.swap_remove(0).context
}

/// The task's training and test examples, the same for the same seed.
pub struct Task {
    pub train: Vec<Example>,
    pub test: Vec<Example>,
    /// The names training documents may use; the base model draws fresh
    /// documents about them.
    pub train_names: Vec<String>,
}

impl Task {
    pub fn new(seed: u64, train_documents: usize, test_documents: usize, form: AnswerForm) -> Task {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let (train_names, test_names) = names();
        let mut documents = |names: &[String], count: usize, questions: usize| {
            (0..count)
                .flat_map(|_| document(names, PEOPLE, questions, form, &mut rng))
                .collect()
        };
        Task {
            train: documents(&train_names, train_documents, 4),
            test: documents(&test_names, test_documents, 2),
            train_names,
        }
    }

    /// Text to train the tokenizer on: every training context and question
    /// in the prompt layout `sac` reads them in (so that its headings are a
    /// few tokens, not one a character), and every answer.
    pub fn corpus(&self) -> Vec<String> {
        self.train
            .iter()
            .flat_map(|e| {
                [
                    format!("{CONTEXT_PREFIX}{}", e.context),
                    PromptLayout::raw().question_text(&e.question),
                    e.answer.clone(),
                ]
            })
            .collect()
    }
}
