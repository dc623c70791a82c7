from mgrit_gru.cli import main

raise SystemExit(main())
