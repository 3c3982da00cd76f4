"""The models llamad serves: each one's runtime and admission gate, placement by memory, the fleet."""
