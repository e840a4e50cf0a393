insert into t (v) values (1);
