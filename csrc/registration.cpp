#include "schemas.h"

TORCH_LIBRARY(fastar, m) { fastar::define_schemas(m); }
