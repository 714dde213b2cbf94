"""Use cases. Each public function is one transaction and checks the actor's capabilities first."""
