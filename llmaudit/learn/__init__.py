"""The learning layer: roadmap, bilingual cards and quiz items (YAML, validated), quiz sessions with
fsrs scheduling, progress in SQLite, interview briefs."""
