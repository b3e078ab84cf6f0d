"""Pure decision logic with time passed in: token bucket, circuit breaker, health, outliers."""
