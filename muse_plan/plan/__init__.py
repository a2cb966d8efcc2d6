"""Plans: the PlanSpec model, parsing of human units, the stage planner, YAML io, diff, edits."""
