"""The plan checker's rules, by concern. Each rule takes one round's config (``RULES``) or the whole
plan (``PLAN_RULES``) and returns problem texts naming the key; ``fedtune.privacy.compat`` runs them all."""
